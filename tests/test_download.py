"""download_cifar10 against a local http.server on 127.0.0.1 only (never the real address)."""

import hashlib
import http.server
import re
import socket
import threading
import time

import pytest

from cifar_files import expected_arrays, make_cifar10_tarball
from intrain.data.cifar import load_cifar10
from intrain.data.download import CIFAR10_MD5, CIFAR10_URL, download_cifar10
from intrain.data.errors import DataError

PAYLOAD = make_cifar10_tarball(per_batch=3)
MD5 = hashlib.md5(PAYLOAD).hexdigest()
NAME = "cifar-10-python.tar.gz"


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = PAYLOAD
    support_range = True
    truncate_once = False  # first full-body response stops half way
    requests: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        cls = type(self)
        rng = self.headers.get("Range")
        cls.requests.append(rng)
        if not self.path.endswith(NAME):
            self.send_error(404)
            return
        data, start = cls.payload, 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and cls.support_range:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cls.truncate_once and start == 0:
            cls.truncate_once = False
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    handler = type("H", (_Handler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}/{NAME}"
    yield handler
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _assert_loaded(data_dir):
    splits = load_cifar10(data_dir)
    tx, *_ = expected_arrays(3)
    assert splits.train.images.numpy().tobytes() == tx.tobytes()


def test_constants():
    assert CIFAR10_URL == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert CIFAR10_MD5 == "c58f30108f718f92721af3b95e74349a"


def test_fresh_download(server, tmp_path):
    folder = download_cifar10(tmp_path, url=server.url, md5=MD5, progress=False)
    assert folder == tmp_path / "cifar-10-batches-py"
    assert (tmp_path / NAME).read_bytes() == PAYLOAD
    assert not (tmp_path / f"{NAME}.part").exists()
    assert server.requests == [None]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", NAME]
    _assert_loaded(tmp_path)
    # second call: folder exists, nothing fetched
    assert download_cifar10(tmp_path, url=server.url, md5=MD5, progress=False) == folder
    assert server.requests == [None]


def test_archive_present_is_not_downloaded(server, tmp_path):
    (tmp_path / NAME).write_bytes(PAYLOAD)
    download_cifar10(tmp_path, url=server.url, md5=MD5, progress=False)
    assert server.requests == []
    _assert_loaded(tmp_path)


def test_present_archive_with_bad_checksum(server, tmp_path):
    (tmp_path / NAME).write_bytes(PAYLOAD[:-10])
    with pytest.raises(DataError, match="wrong checksum"):
        download_cifar10(tmp_path, url=server.url, md5=MD5, progress=False)
    assert server.requests == []


@pytest.mark.parametrize("support_range", [True, False])
def test_resume_from_part(server, tmp_path, support_range):
    server.support_range = support_range
    half = len(PAYLOAD) // 2
    (tmp_path / f"{NAME}.part").write_bytes(PAYLOAD[:half])
    download_cifar10(tmp_path, url=server.url, md5=MD5, progress=False)
    assert server.requests == [f"bytes={half}-"]
    assert (tmp_path / NAME).read_bytes() == PAYLOAD
    _assert_loaded(tmp_path)


def test_part_already_complete(server, tmp_path):
    (tmp_path / f"{NAME}.part").write_bytes(PAYLOAD)
    download_cifar10(tmp_path, url=server.url, md5=MD5, progress=False)
    assert server.requests == [f"bytes={len(PAYLOAD)}-"]
    _assert_loaded(tmp_path)


def test_interrupted_then_resumed(server, tmp_path):
    server.truncate_once = True
    with pytest.raises(DataError, match="cannot download") as ei:
        download_cifar10(tmp_path, url=server.url, md5=MD5, progress=False)
    assert "\n" not in str(ei.value)
    part = tmp_path / f"{NAME}.part"
    half = len(PAYLOAD) // 2
    assert part.read_bytes() == PAYLOAD[:half]
    download_cifar10(tmp_path, url=server.url, md5=MD5, progress=True)
    assert server.requests == [None, f"bytes={half}-"]
    assert not part.exists()
    _assert_loaded(tmp_path)


def test_md5_mismatch_deletes_file(server, tmp_path):
    with pytest.raises(DataError, match="wrong checksum.*deleted"):
        download_cifar10(tmp_path, url=server.url, md5="0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_url_is_clean_and_fast(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    url = f"http://127.0.0.1:{port}/x"
    t0 = time.monotonic()
    with pytest.raises(DataError) as ei:
        download_cifar10(tmp_path / "d", url=url, md5=MD5, progress=False)
    assert time.monotonic() - t0 < 10
    msg = str(ei.value)
    assert msg.startswith(f"cannot download {url} (") and "\n" not in msg
    assert "check the network" in msg and str(tmp_path / "d") in msg
    assert ei.value.__cause__ is None


def test_http_error_is_clean(server, tmp_path):
    with pytest.raises(DataError, match="cannot download .*404"):
        download_cifar10(tmp_path, url=server.url.replace(NAME, "missing"), md5=MD5, progress=False)


def _tar_with(members):
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "sym":
                info.type = tarfile.SYMTYPE
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = 3
                tar.addfile(info, io.BytesIO(b"abc"))
    return buf.getvalue()


@pytest.mark.parametrize("members", [
    [("../evil", "file")],
    [("/abs/evil", "file")],
    [("cifar-10-batches-py/../../evil", "file")],
    [("cifar-10-batches-py/link", "sym")],
])
def test_unsafe_archive_rejected(tmp_path, members):
    data = _tar_with(members)
    d = tmp_path / "d"
    d.mkdir()
    (d / NAME).write_bytes(data)
    with pytest.raises(DataError, match="refusing"):
        download_cifar10(d, url="http://127.0.0.1:9/x", md5=hashlib.md5(data).hexdigest(), progress=False)
    assert not (tmp_path / "evil").exists()
    assert sorted(p.name for p in d.iterdir()) == [NAME]


def test_archive_without_cifar_folder(tmp_path):
    data = _tar_with([("other/file", "file")])
    (tmp_path / NAME).write_bytes(data)
    with pytest.raises(DataError, match="does not contain"):
        download_cifar10(tmp_path, url="http://127.0.0.1:9/x", md5=hashlib.md5(data).hexdigest(),
                         progress=False)


def test_disk_full_while_downloading_is_not_called_a_network_error(tmp_path, server, monkeypatch):
    """Writing the .part file fails (ENOSPC simulated by a file object whose write raises): the
    error names the file and the system's reason, not the network."""
    import builtins
    import errno

    from intrain.data import download

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(download, "open", lambda *a, **k: Full(builtins.open(*a, **k)), raising=False)
    with pytest.raises(DataError) as err:
        download_cifar10(tmp_path / "d", url=server.url, md5=MD5, progress=False)
    assert "No space left on device" in str(err.value) and ".part" in str(err.value)
    assert "network" not in str(err.value)
