"""Download stage: resume after a dropped connection, checksum failures, safe extraction, manual datasets."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

try:
    from data_fixtures import http_server
except ImportError:  # tests/ imported as a package
    from tests.data_fixtures import http_server

from replication.data.download import (
    ChecksumError,
    DownloadError,
    ManualDownloadRequired,
    UnsafeArchiveError,
    download,
    require_manual,
    safe_extract,
)

PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes


@pytest.fixture()
def served(tmp_path):
    srv = tmp_path / "srv"
    srv.mkdir()
    (srv / "blob.bin").write_bytes(PAYLOAD)
    return srv


def test_plain_download_and_checksum(served, tmp_path):
    want = hashlib.sha256(PAYLOAD).hexdigest()
    with http_server(served) as (url, _state):
        info = download(f"{url}/blob.bin", tmp_path / "out" / "blob.bin", sha256=want, progress=False)
    assert (tmp_path / "out" / "blob.bin").read_bytes() == PAYLOAD
    assert info["sha256"] == want
    assert not (tmp_path / "out" / "blob.bin.part").exists()


@pytest.mark.reliability  # bad input gives a clear error and damages nothing
def test_interrupted_download_resumes_in_a_later_call(served, tmp_path):
    dest = tmp_path / "blob.bin"
    with http_server(served, drops=1, drop_after=3000) as (url, state):
        with pytest.raises(DownloadError, match="resume"):
            download(f"{url}/drop/blob.bin", dest, progress=False, retries=0)
        part = tmp_path / "blob.bin.part"
        assert part.stat().st_size == 3000 and not dest.exists()
        info = download(f"{url}/drop/blob.bin", dest, sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert info["bytes"] == len(PAYLOAD)
    # the second call asked only for the missing tail
    assert state["requests"][-1]["range"] == "bytes=3000-"


@pytest.mark.reliability  # bad input gives a clear error and damages nothing
def test_interrupted_download_resumes_within_one_call(served, tmp_path):
    dest = tmp_path / "blob.bin"
    with http_server(served, drops=2, drop_after=1000) as (url, state):
        download(f"{url}/drop/blob.bin", dest, progress=False, retries=3, retry_wait_s=0.0)
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in state["requests"]] == [None, "bytes=1000-", "bytes=2000-"]


def test_server_ignoring_range_restarts_cleanly(served, tmp_path):
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(b"garbage!")
    with http_server(served) as (url, state):
        state["ignore_range"] = True
        download(f"{url}/blob.bin", dest, progress=False)
    assert dest.read_bytes() == PAYLOAD


@pytest.mark.reliability  # bad input gives a clear error and damages nothing
def test_checksum_mismatch_names_expected_and_actual(served, tmp_path):
    wrong = "0" * 64
    actual = hashlib.sha256(PAYLOAD).hexdigest()
    with http_server(served) as (url, _):
        with pytest.raises(ChecksumError) as err:
            download(f"{url}/blob.bin", tmp_path / "blob.bin", sha256=wrong, progress=False)
    assert wrong in str(err.value) and actual in str(err.value)
    assert not (tmp_path / "blob.bin").exists() and not (tmp_path / "blob.bin.part").exists()


def test_existing_file_is_verified_not_refetched(served, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"not the payload")
    with http_server(served) as (url, state):
        with pytest.raises(ChecksumError):
            download(f"{url}/blob.bin", dest, sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False)
        assert state["requests"] == []


def test_http_404_is_an_error_naming_the_url(served, tmp_path):
    with http_server(served) as (url, _):
        with pytest.raises(DownloadError, match="404.*nothere"):
            download(f"{url}/nothere.bin", tmp_path / "x", progress=False)


# ---------------------------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------------------------
def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_safe_extract_zip_and_tar(tmp_path):
    z = tmp_path / "ok.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a/b.txt", "hello")
        zf.writestr("c.txt", "world")
    safe_extract(z, tmp_path / "dz")
    assert (tmp_path / "dz" / "a" / "b.txt").read_text() == "hello"
    t = tmp_path / "ok.tar.gz"
    with tarfile.open(t, "w:gz") as tf:
        info = tarfile.TarInfo("x/y.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("x/link")
        link.type, link.linkname = tarfile.SYMTYPE, "y.txt"  # stays inside: allowed
        tf.addfile(link)
    safe_extract(t, tmp_path / "dt")
    assert (tmp_path / "dt" / "x" / "y.txt").read_bytes() == b"abc"


@pytest.mark.reliability  # bad input gives a clear error and damages nothing
@pytest.mark.parametrize("member", ["../evil.txt", "a/../../evil.txt", "/abs/evil.txt"])
def test_zip_path_traversal_refused_and_nothing_written(tmp_path, member):
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("fine.txt", "ok")
        zf.writestr(zipfile.ZipInfo(member), "pwned")
    dest = tmp_path / "sandbox" / "dest"
    with pytest.raises(UnsafeArchiveError, match="evil"):
        safe_extract(z, dest)
    assert _files_under(dest) == []  # refused before anything was written
    assert not (tmp_path / "sandbox" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


@pytest.mark.reliability  # bad input gives a clear error and damages nothing
def test_zip_symlink_member_refused(tmp_path):
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("innocent")
        info.external_attr = (0o120777 << 16)  # S_IFLNK
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        safe_extract(z, tmp_path / "dest")
    assert _files_under(tmp_path / "dest") == []


@pytest.mark.parametrize(
    "kind,name,linkname",
    [("file", "../evil.txt", None), ("sym", "link", "../../etc/passwd"), ("sym", "link", "/etc/passwd"),
     ("hard", "hl", "../evil.txt")],
)
@pytest.mark.reliability  # bad input gives a clear error and damages nothing
def test_tar_traversal_and_escaping_links_refused(tmp_path, kind, name, linkname):
    t = tmp_path / "bad.tar"
    with tarfile.open(t, "w") as tf:
        good = tarfile.TarInfo("fine.txt")
        good.size = 2
        tf.addfile(good, io.BytesIO(b"ok"))
        info = tarfile.TarInfo(name)
        if kind == "file":
            info.size = 5
            tf.addfile(info, io.BytesIO(b"pwned"))
        else:
            info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
            info.linkname = linkname
            tf.addfile(info)
    dest = tmp_path / "sandbox" / "dest"
    with pytest.raises(UnsafeArchiveError):
        safe_extract(t, dest)
    assert _files_under(dest) == []
    assert not (tmp_path / "sandbox" / "evil.txt").exists()


def test_not_an_archive(tmp_path):
    f = tmp_path / "plain.zip"
    f.write_bytes(b"just bytes")
    with pytest.raises(UnsafeArchiveError, match="neither"):
        safe_extract(f, tmp_path / "d")


def test_require_manual_lists_missing_paths_and_instructions(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ManualDownloadRequired) as err:
        require_manual(tmp_path, ["train", "val"], "Get ILSVRC2012_img_val.tar from image-net.org", dataset="imagenet")
    msg = str(err.value)
    assert str(tmp_path / "val") in msg and "ILSVRC2012_img_val.tar" in msg and "imagenet" in msg
    assert str(tmp_path / "train") not in msg
    require_manual(tmp_path, ["train"], "unused")  # present: no error
    assert os.path.isdir(tmp_path / "train")
