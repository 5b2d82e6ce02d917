"""The container: ``docker compose up`` runs a real, healthy broker (issue #6).

Two kinds of test here:

- fast ones for ``python -m broker.health`` (the container's healthcheck)
  against an in-process broker, plain and with CURVE keys;
- ``test_compose_up_chat_restart_keep_history`` (marked ``docker``): builds the
  image offline and runs it with Compose for real, as root, on the machine
  prepared by ``../shared/tools/docker-engine.sh``. It takes minutes (the vfs
  storage driver copies the whole filesystem at every build step). Run it with
  ``pytest tests/test_docker.py -m docker -s`` (``-s`` shows its progress).
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq.auth

from broker import health
from tests.conftest import RunningBroker

REPO = Path(__file__).resolve().parents[1]
ENGINE = Path(__file__).resolve().parents[2] / "shared" / "tools" / "docker-engine.sh"
BASE_IMAGE = "zchat-base:bookworm"
#: uid of the image's unprivileged user (see the Dockerfile).
CONTAINER_UID = 10001
HOST = "127.0.0.1"


# ---------------------------------------------------------------- broker.health (fast)


def make_keys(root: Path, users: list[str]) -> Path:
    """A broker key directory: broker.key(_secret), USER.key_secret, authorized/USER.key."""
    (root / "authorized").mkdir(parents=True)
    zmq.auth.create_certificates(root, "broker")
    for user in users:
        zmq.auth.create_certificates(root, user)
        shutil.copy(root / f"{user}.key", root / "authorized" / f"{user}.key")
    return root


def test_health_ok_against_a_live_broker(broker: RunningBroker, capsys: pytest.CaptureFixture[str]) -> None:
    assert health.main(["--port", str(broker.port), "--timeout", "5"]) == 0
    assert capsys.readouterr().err == ""


def test_health_fails_when_nothing_answers(capsys: pytest.CaptureFixture[str]) -> None:
    assert health.main(["--port", str(free_port()), "--timeout", "0.3"]) == 1
    assert "unhealthy: no answer from tcp://127.0.0.1:" in capsys.readouterr().err


def test_health_fails_on_something_that_is_not_a_broker(capsys: pytest.CaptureFixture[str]) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port(f"tcp://{HOST}")

    def answer_garbage() -> None:
        if router.poll(5000):
            identity, _ = router.recv_multipart()
            router.send_multipart([identity, b"\xc1 not msgpack"])

    thread = threading.Thread(target=answer_garbage)
    thread.start()
    try:
        assert health.main(["--port", str(port), "--timeout", "5"]) == 1
    finally:
        thread.join(10)
        router.close()
        ctx.term()
    assert "not a zchat envelope" in capsys.readouterr().err


def test_health_speaks_curve_to_a_broker_with_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = make_keys(tmp_path / "keys", ["health"])
    running = RunningBroker(tmp_path / "data", keys_dir=keys).start()
    try:
        port = str(running.port)
        assert health.main(["--port", port, "--keys", str(keys), "--timeout", "5"]) == 0
        # Without CURVE a keyed broker says nothing: unhealthy, not a false "ok".
        assert health.main(["--port", port, "--timeout", "0.5"]) == 1
        assert "no answer" in capsys.readouterr().err
        # A key the broker does not know is refused the same way.
        zmq.auth.create_certificates(tmp_path, "stranger")
        stranger = ["--key", str(tmp_path / "stranger.key_secret")]
        assert health.main(["--port", port, "--keys", str(keys), *stranger, "--timeout", "0.5"]) == 1
        assert "authorized" in capsys.readouterr().err
        # No health key at all: the reason says how to make one.
        (keys / "health.key_secret").unlink()
        assert health.main(["--port", port, "--keys", str(keys), "--timeout", "0.5"]) == 1
        assert "zchat-keygen health" in capsys.readouterr().err
    finally:
        running.stop()


# ---------------------------------------------------------------- docker compose (slow, real)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def step(message: str, started: float) -> None:
    print(f"[docker {time.monotonic() - started:6.1f} s] {message}", flush=True)


def run(args: list[str], timeout: float, env: dict[str, str] | None = None, check: bool = True, **kw: Any) -> str:
    """Run a command to completion within ``timeout``; its stdout, or fail with all of its output."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, check=False, **kw)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{args} did not finish within {timeout} s\n{exc.stdout!r}\n{exc.stderr!r}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return str(proc.stdout)


def docker_engine() -> None:
    """The engine, Compose and the offline base image, or a failure that says what is missing."""
    if os.geteuid() != 0:
        pytest.fail("the docker test must run as root (it starts dockerd with docker-engine.sh)")
    if not ENGINE.is_file():
        pytest.fail(f"{ENGINE} is missing: the docker test needs it to start dockerd and build {BASE_IMAGE}")
    run(["bash", str(ENGINE)], timeout=900)
    # An image made by `docker import` of a `mktemp -d` tree has "/" at mode
    # 0700, which no unprivileged user can traverse: every exec then fails with
    # "permission denied". Re-import it through `docker export`, whose stream
    # has no entry for "/", which Docker then creates 0755.
    mode = run(["docker", "run", "--rm", BASE_IMAGE, "stat", "-c", "%a", "/"], timeout=120).strip()
    if int(mode, 8) & 0o005 != 0o005:
        print(f"re-importing {BASE_IMAGE}: its / has mode {mode}", flush=True)
        broken = run(["docker", "image", "inspect", "-f", "{{.Id}}", BASE_IMAGE], timeout=60).strip()
        container = run(["docker", "create", BASE_IMAGE, "true"], timeout=120).strip()
        try:
            export = subprocess.Popen(["docker", "export", container], stdout=subprocess.PIPE)
            run(["docker", "import", "-", BASE_IMAGE], timeout=300, stdin=export.stdout)
            assert export.wait(timeout=60) == 0
        finally:
            run(["docker", "rm", container], timeout=60)
        run(["docker", "rmi", broken], timeout=120)


def container_target() -> list[str]:
    """pip options that select wheels for the base image's Python and C library, whatever the host's."""
    probe = "import platform, sys; v = sys.version_info; print(v[0], v[1], platform.libc_ver()[1], platform.machine())"
    major, minor, glibc, machine = run(["docker", "run", "--rm", BASE_IMAGE, "python3", "-c", probe], 120).split()
    glibc_minor = int(glibc.split(".")[1])
    platforms = [f"manylinux_2_{m}_{machine}" for m in range(17, glibc_minor + 1)]
    platforms += [f"manylinux2014_{machine}", f"manylinux2010_{machine}", f"manylinux1_{machine}"]
    options = ["--only-binary=:all:", "--implementation", "cp", "--python-version", f"{major}.{minor}"]
    options += ["--abi", f"cp{major}{minor}"]
    for platform in platforms:
        options += ["--platform", platform]
    return options


def build_wheels() -> Path:
    """Wheels of the build backend and the runtime dependencies, in the repo's wheels/ (gitignored).

    The project itself is always built from source in the image, so no wheel of
    it is needed (and .dockerignore keeps any out of the build context).
    """
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = project["build-system"]["requires"] + project["project"]["dependencies"]
    wheels = REPO / "wheels"
    wheels.mkdir(exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d", str(wheels)]
    run([*pip, *container_target(), *requirements], timeout=600)
    return wheels


def zchat_command() -> list[str]:
    script = Path(sys.executable).parent / "zchat"
    return [str(script)] if script.exists() else [sys.executable, "-m", "client.cli"]


class Compose:
    """``docker-compose -p zchat-test-XXXX`` in the repo, on ports chosen here."""

    def __init__(self) -> None:
        self.project = f"zchat-test-{secrets.token_hex(4)}"
        self.port, self.pub_port = free_port(), free_port()
        while self.pub_port == self.port:
            self.pub_port = free_port()
        self.up = False
        self.files = ["-f", str(REPO / "docker-compose.yml")]
        self.env = {
            **os.environ,
            "PYTHON_IMAGE": BASE_IMAGE,
            "ZCHAT_PORT": str(self.port),
            "ZCHAT_PUB_PORT": str(self.pub_port),
            "ZCHAT_BIND": HOST,
        }

    def __call__(self, *args: str, timeout: float = 300) -> str:
        # Compose v1 (what docker-engine.sh installs), else the v2 plugin: same file, same commands.
        binary = shutil.which("docker-compose")
        base = [binary] if binary else ["docker", "compose"]
        return run([*base, "-p", self.project, *self.files, *args], timeout=timeout, env=self.env, cwd=REPO)

    def container(self) -> str:
        cid = self("ps", "-q", "broker", timeout=60).strip()
        assert cid, "no broker container"
        return cid

    def inspect(self, fmt: str) -> str:
        return run(["docker", "inspect", "-f", fmt, self.container()], timeout=60).strip()

    def logs(self) -> str:
        try:
            return self("logs", "--no-color", "--tail", "60", timeout=60)
        except AssertionError as exc:
            return str(exc)

    def wait_healthy(self, timeout: float = 180, after: str = "") -> None:
        """Until the container (started at another time than ``after``) reports healthy."""
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            started, status = self.inspect("{{.State.StartedAt}} {{.State.Health.Status}}").split()
            if started != after and status == "healthy":
                return
            if status == "unhealthy":
                break
            time.sleep(1)
        raise AssertionError(f"broker not healthy within {timeout} s (last: {status})\n{self.logs()}")

    def zchat(self, *args: str, stdin: str = "", timeout: float = 60) -> str:
        """A one-shot or pipe-mode client from the host through the published ports."""
        flags = ["--host", HOST, "--port", str(self.port), "--pub-port", str(self.pub_port)]
        return run([*zchat_command(), *flags, *args], timeout=timeout, input=stdin)


class LineReader:
    """A pipe-mode client's stdout, line by line, with bounded waits."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                self.lines.put(line)

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, match: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            event = json.loads(line)
            if match(event):
                return dict(event)
        raise AssertionError(f"no matching event within {timeout} s; got:\n{''.join(self.seen)}")


def events(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


@pytest.fixture
def compose() -> Iterator[Compose]:
    """A Compose project of its own; whatever it brought up is taken down, volume and image included."""
    project = Compose()
    yield project
    if project.up:
        started = time.monotonic()
        project("down", "-v", "--rmi", "local", timeout=300)
        step("down", started)


@pytest.mark.docker
@pytest.mark.timeout(1200)
def test_compose_up_chat_restart_keep_history(compose: Compose, tmp_path: Path) -> None:
    # Not a skip when this machine cannot run it: a skipped test is a test we do not have.
    started = time.monotonic()
    docker_engine()
    step("engine ready", started)
    build_wheels()
    step("wheels ready", started)
    compose.up = True
    compose("up", "-d", "--build", timeout=900)
    step("up --build done", started)
    compose.wait_healthy()
    step("healthy", started)
    assert compose.inspect("{{.Config.User}}") == "zchat"
    assert compose(
        "exec", "-T", "broker", "python", "-c", "import os; print(os.getuid(), os.access('/data', os.W_OK))", timeout=60
    ).split() == [str(CONTAINER_UID), "True"]

    # bob listens in pipe mode; his own line acked means he is in the room.
    flags = ["--host", HOST, "--port", str(compose.port), "--pub-port", str(compose.pub_port)]
    bob_proc = subprocess.Popen(
        [*zchat_command(), *flags, "--name", "bob", "--json"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        bob = LineReader(bob_proc)
        assert bob_proc.stdin is not None
        bob_proc.stdin.write("bob here\n")
        bob_proc.stdin.flush()
        bob.wait_for(lambda e: e["type"] == "msg" and e["text"] == "bob here" and bool(e.get("own")))
        assert "hi" in compose.zchat("--name", "alice", "--send", "hi")
        hi = bob.wait_for(lambda e: e["type"] == "msg" and e["from"] == "alice")
        assert hi["text"] == "hi"
        bob_proc.stdin.close()
        assert bob_proc.wait(timeout=30) == 0, bob_proc.stderr.read() if bob_proc.stderr else ""
    finally:
        if bob_proc.poll() is None:
            bob_proc.kill()
            bob_proc.wait(timeout=10)
    step("alice -> bob through the published ports", started)

    # The history is in the named volume: it survives a restart of the container.
    before = compose.inspect("{{.State.StartedAt}}")
    compose("restart", timeout=120)
    compose.wait_healthy(after=before)
    step("restarted, healthy", started)
    backlog = events(compose.zchat("--name", "carol", "--backlog", "10", "--json"))
    assert [(e["seq"], e["from"], e["text"]) for e in backlog if e["type"] == "msg" and e["from"] == "alice"] == [
        (hi["seq"], "alice", "hi")
    ]
    [after] = events(compose.zchat("--name", "alice", "--send", "after the restart", "--json"))
    assert after["seq"] > hi["seq"]
    step("history kept across the restart", started)

    # CURVE keys mounted into the container: only key holders get in, and the
    # healthcheck finds its own key through ZCHAT_KEYS.
    keys = make_keys(tmp_path / "keys", ["health", "erin"])
    for path in [keys, *keys.rglob("*")]:
        os.chown(path, CONTAINER_UID, -1)
    override = tmp_path / "keys.yml"
    override.write_text(
        'version: "3.8"\nservices:\n  broker:\n    environment:\n      ZCHAT_KEYS: /keys\n'
        f"    volumes:\n      - {keys}:/keys:ro\n"
    )
    compose.files += ["-f", str(override)]
    before = compose.inspect("{{.State.StartedAt}}")
    compose("up", "-d", timeout=300)
    compose.wait_healthy(after=before)
    step("recreated with CURVE keys, healthy", started)
    erin = ["--name", "erin", "--key", str(keys / "erin.key_secret"), "--broker-key", str(keys / "broker.key")]
    backlog = events(compose.zchat(*erin, "--backlog", "50", "--json"))
    assert [e["text"] for e in backlog if e["type"] == "msg"] == ["bob here", "hi", "after the restart"]
    refused = subprocess.run(
        [*zchat_command(), *flags, "--name", "mallory", "--send", "let me in"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0 and "CURVE" in refused.stderr, refused.stderr
    step("CURVE: erin reads the history, mallory without a key is refused", started)
