import pytest

from store.artifacts import ArtifactStore, sha256_bytes
from store.errors import ChecksumMismatch, NotFound, UriOutsideRoot


def test_write_returns_uri_checksum_and_size(artifacts):
    ref = artifacts.put_bytes("a/b.txt", b"hello")
    assert ref.sha256 == sha256_bytes(b"hello") and ref.size_bytes == 5
    assert ref.uri.startswith(artifacts.root_url)
    assert artifacts.read_bytes(ref.uri, ref.sha256) == b"hello"


def test_tampered_file_is_refused(artifacts):
    ref = artifacts.put_bytes("model.bin", b"weights")
    with open(artifacts.path_of(ref.uri), "wb") as fh:
        fh.write(b"poisoned")
    with pytest.raises(ChecksumMismatch, match="tampered with: sha256 .* the registry says " + ref.sha256):
        artifacts.read_bytes(ref.uri, ref.sha256)


def test_fetched_copy_of_a_tampered_file_is_removed(artifacts, tmp_path):
    ref = artifacts.put_bytes("x.bin", b"abc")
    with open(artifacts.path_of(ref.uri), "ab") as fh:
        fh.write(b"!")
    with pytest.raises(ChecksumMismatch):
        artifacts.fetch_file(ref.uri, ref.sha256, tmp_path / "copy.bin")
    assert not (tmp_path / "copy.bin").exists()


def test_directory_round_trip_and_tamper(artifacts, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"n_layer": 2}')
    (src / "sub" / "model.safetensors").write_bytes(b"\x00" * 100)
    ref = artifacts.put_dir("policies/p1", src)
    assert ref.is_dir and ref.size_bytes == len('{"n_layer": 2}') + 100
    out = artifacts.fetch_dir(ref.uri, ref.sha256, tmp_path / "out")
    assert (out / "sub" / "model.safetensors").read_bytes() == b"\x00" * 100
    with open(artifacts.path_of(ref.uri) + "/config.json", "w") as fh:
        fh.write('{"n_layer": 3}')
    with pytest.raises(ChecksumMismatch, match="directory artifact"):
        artifacts.fetch_dir(ref.uri, ref.sha256, tmp_path / "out2")


@pytest.mark.parametrize("key", ["../escape.txt", "a/../../escape.txt", "/etc/passwd", ""])
def test_keys_outside_the_root_are_refused(artifacts, key):
    with pytest.raises(UriOutsideRoot):
        artifacts.put_bytes(key, b"x")


def test_uris_outside_the_root_are_refused(artifacts, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    for uri in [f"file://{outside}", str(outside), artifacts.root_url + "/../secret.txt", "memory://root/x"]:
        with pytest.raises(UriOutsideRoot, match="outside the artifact root|not on the artifact filesystem"):
            artifacts.read_bytes(uri, sha256_bytes(b"secret"))


def test_missing_artifact_is_not_found(artifacts):
    with pytest.raises(NotFound, match="does not exist"):
        artifacts.read_bytes(artifacts.uri_of("nope.bin"), "0" * 64)


def test_any_fsspec_filesystem_works():
    store = ArtifactStore("memory://ratchet-test-root")
    ref = store.put_bytes("d/x.jsonl", b'{"a": 1}\n')
    assert ref.uri.startswith("memory://")
    assert store.read_bytes(ref.uri, ref.sha256) == b'{"a": 1}\n'
