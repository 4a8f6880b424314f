"""Caption relabeling: captioners (`captioner`, `metadata`, `vlm`), the resumable job over shards
(`job`), caption quality checks (`quality`) and the job summary's statistics (`stats`)."""
