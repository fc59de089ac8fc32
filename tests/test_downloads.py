"""The real download path over HTTP: files served from 127.0.0.1, staged only when whole and hash-checked.

The published specs hold real URLs; each test points a copy (dataclasses.replace) at a local server
and at the digest of the bytes it serves, then runs the same ``weights.fetch`` / ``data.download``
code that stages the ImageNet weights and the CIFAR-10 tarball.
"""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest

from cnnbench import data, weights
from cnnbench.data import DataError
from cnnbench.weights import PRETRAINED, WeightsError
from conftest import package_env
from test_data import make_cifar_tarball


class FileServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` (URL path -> bytes); a path in ``announced`` gets that Content-Length instead of
    the body's, and the connection closes after the body: a download cut short."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.files: dict[str, bytes] = {}
        self.announced: dict[str, int] = {}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_port}/{path}"


class FileHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = self.path.lstrip("/")
        if path not in self.server.files:
            self.send_error(404)
            return
        body = self.server.files[path]
        self.send_response(200)
        self.send_header("Content-Length", str(self.server.announced.get(path, len(body))))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = FileServer()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


WEIGHTS_BYTES = np.random.default_rng(0).bytes(3 << 20)  # three of stream_to_file's 1 MiB blocks
SPECS = {"torch sha256": PRETRAINED[("torch", "alexnet")], "keras md5": PRETRAINED[("keras", "vgg16")]}


def spec_for(published, url: str, content: bytes):
    """``published`` pointed at ``url``, with the digest of ``content`` in the publisher's form."""
    digest = hashlib.new(published.algorithm, content).hexdigest()
    # torchvision publishes the first 8 hex digits of the sha256 (in the file name); Keras the whole md5
    return replace(published, url=url, digest=digest[:len(published.digest)])


@pytest.mark.parametrize("name", SPECS)
def test_fetch_stages_the_served_weights_when_their_hash_matches(name, server, tmp_path):
    published = SPECS[name]
    server.files[published.filename] = WEIGHTS_BYTES
    dest = tmp_path / "imagenet" / published.filename
    assert weights.fetch(spec_for(published, server.url(published.filename), WEIGHTS_BYTES), dest) == dest
    assert dest.read_bytes() == WEIGHTS_BYTES
    assert [p.name for p in dest.parent.iterdir()] == [published.filename]


@pytest.mark.parametrize("name", SPECS)
def test_fetch_refuses_weights_with_another_hash_and_keeps_nothing(name, server, tmp_path):
    published = SPECS[name]
    served = WEIGHTS_BYTES[:-1] + b"\x00"  # one byte off from what the digest describes
    server.files[published.filename] = served
    dest = tmp_path / "imagenet" / published.filename
    spec = spec_for(published, server.url(published.filename), WEIGHTS_BYTES)
    with pytest.raises(WeightsError, match=f"has {published.algorithm} .* is published as {spec.digest}.*"
                                           "Delete it and run the workflow again"):
        weights.fetch(spec, dest)
    assert list(dest.parent.iterdir()) == []  # neither the file nor its temporary copy


def test_fetch_detects_a_truncated_download(server, tmp_path):
    published = SPECS["torch sha256"]
    server.files[published.filename] = WEIGHTS_BYTES[:(1 << 20) + 5]
    server.announced[published.filename] = len(WEIGHTS_BYTES)
    dest = tmp_path / "imagenet" / published.filename
    with pytest.raises(WeightsError, match=f"could not download {server.url(published.filename)} .*truncated"):
        weights.fetch(spec_for(published, server.url(published.filename), WEIGHTS_BYTES), dest)
    assert list(dest.parent.iterdir()) == []


def test_cifar10_download_detects_a_truncated_tarball(server, tmp_path):
    tarball = tmp_path / "served.tar.gz"
    make_cifar_tarball(tarball)
    content = tarball.read_bytes()
    server.files["cifar-10-python.tar.gz"] = content[:len(content) // 2]
    server.announced["cifar-10-python.tar.gz"] = len(content)
    dest = tmp_path / "resources" / "cifar-10-python.tar.gz"
    with pytest.raises(DataError, match=r"truncated.*data\.cifar10\.path"):
        data.download(server.url("cifar-10-python.tar.gz"), dest, hashlib.md5(content).hexdigest())
    assert list(dest.parent.iterdir()) == []


def test_prepare_downloads_the_missing_cifar10_tarball(server, tmp_path):
    tarball = tmp_path / "served.tar.gz"
    truth = make_cifar_tarball(tarball)
    server.files["cifar-10-python.tar.gz"] = tarball.read_bytes()
    dest = tmp_path / "resources" / "cifar-10-python.tar.gz"
    md5 = hashlib.md5(tarball.read_bytes()).hexdigest()
    config = {"source": "cifar10", "val_size": 10, "split_seed": 0,
              "cifar10": {"url": server.url("cifar-10-python.tar.gz"), "md5": md5, "path": str(dest)}}
    sizes = data.prepare(config, tmp_path / "prepared.npz")
    assert dest.read_bytes() == tarball.read_bytes()
    assert sizes == {"y_train": 90, "y_val": 10, "y_test": 20}
    prepared = data.load_prepared(tmp_path / "prepared.npz")
    assert np.array_equal(prepared["x_test"], truth["test_batch"][0])


def download_cli(url: str, md5: str, out):
    return subprocess.run([sys.executable, "-m", "cnnbench.data", "download", "--url", url, "--md5", md5,
                           "--out", str(out)], capture_output=True, text=True, env=package_env(), timeout=60)


def test_download_command_stages_the_tarball_and_refuses_a_wrong_md5(server, tmp_path):
    tarball = tmp_path / "served.tar.gz"
    make_cifar_tarball(tarball)
    server.files["cifar-10-python.tar.gz"] = tarball.read_bytes()
    url, md5 = server.url("cifar-10-python.tar.gz"), hashlib.md5(tarball.read_bytes()).hexdigest()
    dest = tmp_path / "resources" / "cifar-10-python.tar.gz"

    refused = download_cli(url, "0" * 32, dest)
    assert refused.returncode == 1
    assert f"checksum mismatch for {url}: md5 {md5}, expected {'0' * 32}" in refused.stderr
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []

    staged = download_cli(url, md5, dest)
    assert staged.returncode == 0, staged.stderr
    assert f"downloaded {url} to {dest} (md5 verified)" in staged.stdout
    assert dest.read_bytes() == tarball.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]
