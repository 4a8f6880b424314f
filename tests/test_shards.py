import pytest

from pixart.data.shards import resolve_shards, shard_name
from pixart.errors import PixArtError


@pytest.fixture
def shard_dir(tmp_path):
    for i in range(3):
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a shard")
    return tmp_path


def test_every_spec_form_resolves_to_the_same_shards(shard_dir):
    expected = [str(shard_dir / f"shard-{i:06d}.tar") for i in range(3)]
    assert resolve_shards(shard_dir) == expected
    assert resolve_shards(str(shard_dir / "shard-*.tar")) == expected
    assert resolve_shards(str(shard_dir / "shard-{000000..000002}.tar")) == expected
    assert resolve_shards([expected[2], str(shard_dir)]) == [expected[2]] + expected[:2]  # de-duplicated


def test_urls_pass_through_with_braces_expanded():
    assert resolve_shards("pipe:cat /d/s-{0..1}.tar") == ["pipe:cat /d/s-0.tar", "pipe:cat /d/s-1.tar"]
    assert resolve_shards("s3://bucket/a.tar") == ["s3://bucket/a.tar"]


def test_missing_shards_are_one_clear_error(shard_dir, tmp_path):
    with pytest.raises(PixArtError, match=r"shard-000003\.tar: no such shard"):
        resolve_shards(str(shard_dir / "shard-{000000..000009}.tar"))
    with pytest.raises(PixArtError, match="no shards found"):
        resolve_shards(str(shard_dir / "other-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PixArtError, match="no shards found"):
        resolve_shards(tmp_path / "empty")


def test_shard_name():
    assert shard_name("/data/sam-000001.tar") == "sam-000001"
    assert shard_name("pipe:curl -s https://h/x/s-01.tar") == "s-01"
    assert shard_name("pipe:aws s3 cp s3://b/sa-000000.tar -") == "sa-000000"  # the README's form
    assert shard_name("pipe:cat /data/x.tar | head -c 100") == "x"
    assert shard_name("pipe:curl -sL 'https://h/x-001.tar?a=1&b=2'") == "x-001"  # quoted for the shell
    assert shard_name("https://h/x/s-02.tar?X-Amz-Signature=abc") == "s-02"
    assert shard_name("/data/my shards/s 03.tar") == "s 03"
    with pytest.raises(PixArtError, match="names no .tar file"):
        shard_name("pipe:cat -")


def test_duplicate_shard_names_are_refused_naming_both():
    from pixart.data.shards import check_unique_names

    assert check_unique_names(["/a/s-0.tar", "/a/s-1.tar"]) == ["s-0", "s-1"]
    with pytest.raises(PixArtError, match=r"both named s-0\.tar: /a/s-0\.tar and /b/s-0\.tar"):
        check_unique_names(["/a/s-0.tar", "/a/s-1.tar", "/b/s-0.tar"])
