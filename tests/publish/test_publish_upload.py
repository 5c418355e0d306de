"""publish's upload against a Hub on loopback: a threaded http.server that answers what
huggingface_hub's `create_repo` and `upload_folder` call (POST /api/repos/create, the
preupload endpoint, answered "regular" for every file so that all content comes inline in the
commit, and the NDJSON commit with base64 file contents). The server must receive every file's
exact bytes; no token, an HTTP 500 and an endpoint nobody listens on each stop apply with one
line naming the endpoint, with every folder left where the line says."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from albor.errors import StageFailed
from albor.stage import load_stage, run_stage
from albor.stages import publish
from helpers import run

TOKEN = "hf_loopback_token_0123456789"


class FakeHub(ThreadingHTTPServer):
    """The Hub endpoints upload_folder uses, keeping what it was sent."""

    def __init__(self, fail_with: int | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fail_with = fail_with
        self.created: list[dict[str, Any]] = []
        self.files: dict[str, dict[str, bytes]] = {}  # repo id -> path -> bytes
        self.commits: list[str] = []
        self.auth: set[str] = set()
        self.unexpected: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args: Any) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.unexpected.append(f"GET {self.path}")
        self._send(404, {"error": "not here"})

    def do_POST(self) -> None:
        hub = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        hub.auth.add(self.headers.get("Authorization", ""))
        if hub.fail_with is not None:
            self._send(hub.fail_with, {"error": "the loopback hub is down"})
            return
        path = self.path.split("?")[0]
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            payload = json.loads(body)
            hub.created.append(payload)
            owner = payload.get("organization") or "loopback-user"
            self._send(200, {"url": f"{hub.url}/{owner}/{payload['name']}"})
        elif path == "/api/validate-yaml":
            self._send(200, {})
        elif parts[:2] == ["api", "models"] and parts[-2] == "preupload":
            repo = "/".join(parts[2:-2])
            files = json.loads(body)["files"]
            hub.files.setdefault(repo, {})
            self._send(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files
                    ]
                },
            )
        elif parts[:2] == ["api", "models"] and parts[-2] == "commit":
            repo = "/".join(parts[2:-2])
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    value = item["value"]
                    assert value["encoding"] == "base64"
                    hub.files.setdefault(repo, {})[value["path"]] = base64.b64decode(
                        value["content"]
                    )
                elif item["key"] != "header":
                    hub.unexpected.append(f"commit item {item['key']}")
            hub.commits.append(repo)
            oid = f"{len(hub.commits):040x}"
            self._send(
                200,
                {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid},
            )
        else:
            hub.unexpected.append(f"POST {path}")
            self._send(404, {"error": f"no route {path}"})


def _serve(fail_with: int | None = None) -> Iterator[FakeHub]:
    hub = FakeHub(fail_with)
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    yield from _serve()


@pytest.fixture
def broken_hub() -> Iterator[FakeHub]:
    yield from _serve(fail_with=500)


def _config(workdir: Path, out: Path, endpoint: str, **fields: Any) -> publish.Config:
    return publish.Config(
        models=[workdir / "distill", workdir / "pruned"],
        export=workdir / "export",
        quantize=workdir / "quantize",
        report=workdir / "report",
        output=out,
        upload=True,
        endpoint=endpoint,
        **fields,
    )


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_upload_sends_every_file_exactly(
    workdir: Path, tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "publish"
    result = run_stage(load_stage("publish"), _config(workdir, out, hub.url, namespace="ladder"))
    assert hub.unexpected == []
    assert hub.auth == {f"Bearer {TOKEN}"}
    assert [c["name"] for c in hub.created] == [
        "albor-distill",
        "albor-pruned",
        "albor-pruned-gguf",
    ]
    assert all(
        c["organization"] == "ladder" and c.get("visibility") != "private" for c in hub.created
    )
    record = json.loads((out / "publish.json").read_text())
    for variant, entry in record.items():
        repo = f"ladder/albor-{variant}"
        assert entry["repo_id"] == repo and entry["uploaded"] is True
        assert entry["url"] == f"{hub.url}/{repo}"
        assert hub.files[repo] == _tree(out / variant)  # every file, byte for byte
    assert result.manifest["metrics"]["uploaded"] == 3
    # The token is used, never recorded.
    for path in out.rglob("*.json"):
        assert TOKEN not in path.read_text()


def test_the_token_user_is_the_default_namespace(
    workdir: Path, tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_HUB_TOKEN", TOKEN)
    out = tmp_path / "publish"
    cfg = publish.Config(
        models=[workdir / "instruct"],
        output=out,
        upload=True,
        endpoint=hub.url,
        token_env="MY_HUB_TOKEN",
        private=True,
        repo_prefix="tiny",
    )
    run_stage(load_stage("publish"), cfg)
    (created,) = hub.created
    assert created["name"] == "tiny-instruct" and created["organization"] is None
    assert created["visibility"] == "private"
    record = json.loads((out / "publish.json").read_text())
    assert record["instruct"]["repo_id"] == "loopback-user/tiny-instruct"
    assert hub.files["loopback-user/tiny-instruct"] == _tree(out / "instruct")


def _apply_cli(
    workdir: Path, tmp_path: Path, out: Path, endpoint: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    cfg = {
        "models": [str(workdir / "distill")],
        "report": str(workdir / "report"),
        "output": str(out),
        "upload": True,
        "endpoint": endpoint,
    }
    path = tmp_path / "publish.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run(["publish", "apply", str(path)], capsys)
    return code, err


def test_no_token_stops_with_one_line_and_keeps_the_folders(
    workdir: Path,
    tmp_path: Path,
    hub: FakeHub,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "publish"
    code, err = _apply_cli(workdir, tmp_path, out, hub.url, capsys)
    work = tmp_path / ".publish.partial"
    assert code == 1
    assert err.strip() == (
        f"error: publish: no token in $HF_TOKEN; set it or upload: false; the folders are in {work}"
    )
    assert hub.created == [] and hub.files == {}
    assert (work / "distill" / "model.safetensors").is_file()
    assert json.loads((work / "publish.json").read_text())["distill"]["uploaded"] is False
    assert not out.exists()

    # Once the token is set, the same command uploads what the folders hold.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, err = _apply_cli(workdir, tmp_path, out, hub.url, capsys)
    assert code == 0, err
    assert hub.files["loopback-user/albor-distill"] == _tree(out / "distill")
    assert not work.exists()


def test_an_http_error_stops_with_the_endpoint_and_status_losing_nothing(
    workdir: Path,
    tmp_path: Path,
    broken_hub: FakeHub,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "publish"
    # An earlier build (upload: false) is the output; the failed upload must leave it as it was.
    run_stage(
        load_stage("publish"),
        publish.Config(models=[workdir / "distill"], report=workdir / "report", output=out),
    )
    before = _tree(out)
    code, err = _apply_cli(workdir, tmp_path, out, broken_hub.url, capsys)
    work = tmp_path / ".publish.partial"
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert f"{broken_hub.url} answered HTTP 500 to create repo of albor-distill" in err
    assert "the loopback hub is down" in err
    assert f"0 of 1 folders uploaded; the folders are in {work}" in err
    assert _tree(out) == before
    assert (work / "distill" / "README.md").is_file()


def test_an_endpoint_nobody_answers_stops_with_one_line(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    out = tmp_path / "publish"
    cfg = publish.Config(models=[workdir / "distill"], output=out, upload=True, endpoint=endpoint)
    with pytest.raises(StageFailed) as e:
        run_stage(load_stage("publish"), cfg)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"publish: cannot reach {endpoint} (create repo of albor-distill)")
    assert message.endswith(f"the folders are in {tmp_path / '.publish.partial'}")
    assert (tmp_path / ".publish.partial" / "distill" / "model.safetensors").is_file()
