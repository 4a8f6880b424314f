import io

from pixart.progress import ShardBar


def test_the_total_is_the_finished_shards_mean_times_the_shards():
    out = io.StringIO()
    bar = ShardBar(4, unit="img", file=out)
    assert bar.total is None  # no shard finished: no estimate, no ETA
    bar.update(10)
    bar.shard_done(10)
    assert bar.total == 40
    bar.update(7)  # a shard in flight on another worker counts in n, not in the mean
    bar.update(6)
    bar.shard_done(6)
    assert bar.total == 32
    bar.close()
    assert "23/32" in out.getvalue()


def test_a_disabled_bar_takes_the_same_calls():
    bar = ShardBar(2, disable=True)
    bar.update(3)
    bar.shard_done(3)
    bar.close()
