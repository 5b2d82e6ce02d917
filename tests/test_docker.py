"""The container: ``docker compose up`` runs a real, healthy broker (issue #6).

Two kinds of test here:

- fast ones for ``python -m broker.health`` (the container's healthcheck)
  against an in-process broker, plain and with CURVE keys;
- ``test_compose_up_chat_restart_keep_history`` and
  ``test_cluster_profile_two_brokers_one_chat`` (marked ``docker``): build the
  images offline and run them with Compose for real, as root, on the machine
  prepared by ``../shared/tools/docker-engine.sh``. They take minutes (the vfs
  storage driver copies the whole filesystem at every build step and for every
  container), so the engine, the wheels and the broker image's build cache are
  prepared once for both. Run them with ``pytest tests/test_docker.py -m docker -s``
  (``-s`` shows their progress).
"""

from __future__ import annotations

import email.parser
import json
import logging
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
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq.auth
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from broker import health
from client.lib import Client
from tests.conftest import RunningBroker, wait_for

REPO = Path(__file__).resolve().parents[1]
ENGINE = Path(__file__).resolve().parents[2] / "shared" / "tools" / "docker-engine.sh"
BASE_IMAGE = "zchat-base:bookworm"
#: The Redis image docs/docker.md has offline users build (docker/redis.Dockerfile);
#: kept after the test, like the base image, so that the next run's build is cached.
REDIS_IMAGE = "zchat-redis:bookworm"
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


def test_a_health_check_leaves_no_info_line_in_the_broker_log(
    make_client: Callable[..., Client], broker: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """The compose file checks every 10 s: each check logged "client connected from" and
    "client disconnected from" at info, 17,280 lines a day. A client's session is still
    said at info (with its address), the connections at debug."""
    caplog.set_level(logging.DEBUG, logger="zchat.broker")
    assert health.main(["--port", str(broker.port), "--timeout", "5"]) == 0

    def broker_lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name.startswith("zchat.broker")]

    # Its disconnection logged (at debug) shows that the broker has seen all of the check.
    wait_for(
        lambda: any("client disconnected from" in r.getMessage() for r in broker_lines()),
        5,
        what=lambda: [r.getMessage() for r in broker_lines()],
    )
    said = [f"{r.levelname} {r.getMessage()}" for r in broker_lines() if r.levelno >= logging.INFO]
    assert said == [], said
    alice = make_client("alice")
    starts = [r for r in broker_lines() if r.getMessage().startswith("session start: alice")]
    assert [r.levelno for r in starts] == [logging.INFO], starts
    assert f"sender={alice.sender}" in starts[0].getMessage()


def test_health_reads_zchat_port_as_the_broker_does(
    broker: RunningBroker, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ZCHAT_PORT", str(broker.port))
    assert health.main(["--timeout", "5"]) == 0
    monkeypatch.setenv("ZCHAT_PORT", "99999")  # checked, and only where --port does not say
    assert health.main(["--port", str(broker.port), "--timeout", "5"]) == 0
    with pytest.raises(SystemExit) as bad:
        health.main([])
    assert bad.value.code == 2
    assert "ZCHAT_PORT='99999': 99999 is not a port number" in capsys.readouterr().err


def test_health_fails_when_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    assert health.main(["--port", str(free_port()), "--timeout", "0.3"]) == 1
    assert "unhealthy: nothing listens at tcp://127.0.0.1:" in capsys.readouterr().err


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


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all bound at once while they are picked)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


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


#: Asks the base image's Python for what pip needs to pick wheels for it: its
#: version, C library and machine, and the values of PEP 508 environment
#: markers (what packaging.markers.default_environment() computes).
TARGET_PROBE = """
import json, os, platform, sys
impl = sys.implementation
version = "{0.major}.{0.minor}.{0.micro}".format(impl.version)
print(json.dumps({
    "glibc": platform.libc_ver()[1],
    "markers": {
        "implementation_name": impl.name,
        "implementation_version": version,
        "os_name": os.name,
        "platform_machine": platform.machine(),
        "platform_release": platform.release(),
        "platform_system": platform.system(),
        "platform_version": platform.version(),
        "python_full_version": platform.python_version(),
        "platform_python_implementation": platform.python_implementation(),
        "python_version": ".".join(platform.python_version_tuple()[:2]),
        "sys_platform": sys.platform,
    },
}))
"""


def probe_target() -> dict[str, Any]:
    return dict(json.loads(run(["docker", "run", "--rm", BASE_IMAGE, "python3", "-c", TARGET_PROBE], 120)))


def container_target(target: dict[str, Any]) -> list[str]:
    """pip options that select wheels for the base image's Python and C library, whatever the host's."""
    markers = target["markers"]
    machine, full_version = markers["platform_machine"], markers["python_full_version"]
    major, minor = full_version.split(".")[:2]
    glibc_minor = int(target["glibc"].split(".")[1])
    platforms = [f"manylinux_2_{m}_{machine}" for m in range(17, glibc_minor + 1)]
    platforms += [f"manylinux2014_{machine}", f"manylinux2010_{machine}", f"manylinux1_{machine}"]
    options = ["--only-binary=:all:", "--implementation", "cp", "--python-version", full_version]
    options += ["--abi", f"cp{major}{minor}"]
    for platform in platforms:
        options += ["--platform", platform]
    return options


def unmet_for_target(wheels: Path, markers: dict[str, str]) -> list[str]:
    """Requirements of the wheels in ``wheels`` that the target needs and no wheel there provides.

    ``pip download --python-version`` picks wheels for the target but evaluates
    environment markers for the Python running pip: redis-py needs
    ``async-timeout`` on Python < 3.11.3 (Debian bookworm has 3.11.2), which a
    download on a newer host Python leaves out.
    """
    have = {canonicalize_name(wheel.name.split("-")[0]) for wheel in wheels.glob("*.whl")}
    unmet: set[str] = set()
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            # Its own, at the top: setuptools carries others' dist-info further down.
            [metadata] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
            message = email.parser.BytesHeaderParser().parsebytes(archive.read(metadata))
        for line in message.get_all("Requires-Dist") or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({**markers, "extra": ""}):
                continue
            if canonicalize_name(requirement.name) not in have:
                requirement.marker = None
                unmet.add(str(requirement))
    return sorted(unmet)


def build_wheels(target: dict[str, Any]) -> Path:
    """Wheels of the build backend, the runtime dependencies and the ``backplane`` extra's, in the
    repo's wheels/ (gitignored): what the Dockerfile installs.

    The project itself is always built from source in the image, so no wheel of
    it is needed (and .dockerignore keeps any out of the build context).
    """
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = project["build-system"]["requires"] + project["project"]["dependencies"]
    requirements += project["project"]["optional-dependencies"]["backplane"]
    wheels = REPO / "wheels"
    wheels.mkdir(exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d", str(wheels)]
    pip += container_target(target)
    run([*pip, *requirements], timeout=600)
    for _ in range(5):
        if not (unmet := unmet_for_target(wheels, target["markers"])):
            return wheels
        run([*pip, *unmet], timeout=600)
    raise AssertionError(f"wheels/ still misses {unmet} for the image's Python")


def build_redis_image() -> None:
    """What docs/docker.md tells offline users: .debs from the host's apt, installed by redis.Dockerfile."""
    run(["bash", str(REPO / "docker" / "redis-debs.sh"), BASE_IMAGE], timeout=300)
    build = ["docker", "build", "-q", "-f", str(REPO / "docker" / "redis.Dockerfile")]
    run([*build, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", REDIS_IMAGE, str(REPO / "docker")], timeout=600)


@pytest.fixture(scope="module")
def docker_ready() -> Iterator[float]:
    """The engine, the wheels and the broker image built once for all the docker tests here.

    The image is kept under a tag of its own until the module is done, so its
    layers stay in the build cache: each test's ``up --build`` (and its
    ``down --rmi local``) then costs seconds instead of a full build. Yields
    when it started, for the tests' progress lines.
    """
    started = time.monotonic()
    docker_engine()
    step("engine ready", started)
    build_wheels(probe_target())
    step("wheels ready", started)
    tag = f"zchat-test-broker:{secrets.token_hex(4)}"
    # The same build as Compose's (build arg and context), so that Compose's hits its cache.
    run(["docker", "build", "-q", "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}", "-t", tag, str(REPO)], timeout=900)
    step("broker image built", started)
    try:
        yield started
    finally:
        run(["docker", "rmi", tag], timeout=300, check=False)


def zchat_command() -> list[str]:
    script = Path(sys.executable).parent / "zchat"
    return [str(script)] if script.exists() else [sys.executable, "-m", "client.cli"]


class Compose:
    """``docker-compose -p zchat-test-XXXX [--profile P]`` in the repo, on host ports chosen here."""

    def __init__(self, profiles: tuple[str, ...] = ()) -> None:
        self.project = f"zchat-test-{secrets.token_hex(4)}"
        self.profiles = [arg for profile in profiles for arg in ("--profile", profile)]
        #: Published (request, room event) ports of each broker service, all distinct.
        ports = free_ports(6)
        self.ports = {"broker": ports[0:2], "broker-a": ports[2:4], "broker-b": ports[4:6]}
        self.port, self.pub_port = self.ports["broker"]
        self.up = False
        self.files = ["-f", str(REPO / "docker-compose.yml")]
        self.env = {
            **os.environ,
            "PYTHON_IMAGE": BASE_IMAGE,
            "REDIS_IMAGE": REDIS_IMAGE,
            "ZCHAT_BIND": HOST,
        }
        for prefix, service in [("ZCHAT", "broker"), ("ZCHAT_A", "broker-a"), ("ZCHAT_B", "broker-b")]:
            self.env[f"{prefix}_PORT"], self.env[f"{prefix}_PUB_PORT"] = map(str, self.ports[service])

    def __call__(self, *args: str, timeout: float = 300) -> str:
        # Compose v1 (what docker-engine.sh installs), else the v2 plugin: same file, same commands.
        binary = shutil.which("docker-compose")
        base = [binary] if binary else ["docker", "compose"]
        command = [*base, "-p", self.project, *self.profiles, *self.files, *args]
        return run(command, timeout=timeout, env=self.env, cwd=REPO)

    def container(self, service: str = "broker") -> str:
        cid = self("ps", "-q", service, timeout=60).strip()
        assert cid, f"no {service} container"
        return cid

    def inspect(self, fmt: str, service: str = "broker") -> str:
        return run(["docker", "inspect", "-f", fmt, self.container(service)], timeout=60).strip()

    def logs(self) -> str:
        try:
            return self("logs", "--no-color", "--tail", "60", timeout=60)
        except AssertionError as exc:
            return str(exc)

    def wait_healthy(self, timeout: float = 180, after: str = "", service: str = "broker") -> None:
        """Until the service's container (started at another time than ``after``) reports healthy."""
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            started, status = self.inspect("{{.State.StartedAt}} {{.State.Health.Status}}", service).split()
            if started != after and status == "healthy":
                return
            if status == "unhealthy":
                break
            time.sleep(1)
        raise AssertionError(f"{service} not healthy within {timeout} s (last: {status})\n{self.logs()}")

    def flags(self, service: str = "broker") -> list[str]:
        """zchat's flags for one broker service through its published ports."""
        port, pub_port = self.ports[service]
        return ["--host", HOST, "--port", str(port), "--pub-port", str(pub_port)]

    def zchat(self, *args: str, stdin: str = "", timeout: float = 60, service: str = "broker") -> str:
        """A one-shot or pipe-mode client from the host through the published ports."""
        return run([*zchat_command(), *self.flags(service), *args], timeout=timeout, input=stdin)


class LineReader:
    """A pipe-mode client's stdout, line by line, with bounded waits.

    Events that one wait passes over stay for the next: a DM and a room message
    travel different sockets, so their order on stdout is not theirs to promise.
    """

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.unmatched: list[dict[str, Any]] = []
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                self.lines.put(line)

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, match: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
        """The first event, read before or during this wait and not yet matched, that ``match`` takes."""
        for i, event in enumerate(self.unmatched):
            if match(event):
                return dict(self.unmatched.pop(i))
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
            self.unmatched.append(event)
        raise AssertionError(f"no matching event within {timeout} s; got:\n{''.join(self.seen)}")


def events(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def take_down(project: Compose) -> None:
    """Whatever ``project`` brought up goes: containers, volumes, and the images it built."""
    if project.up:
        started = time.monotonic()
        project("down", "-v", "--rmi", "local", timeout=300)
        step("down", started)


@pytest.fixture
def compose() -> Iterator[Compose]:
    """A Compose project of its own, without profiles: the single broker."""
    project = Compose()
    yield project
    take_down(project)


@pytest.fixture
def cluster() -> Iterator[Compose]:
    """A Compose project of its own with ``--profile cluster``: Redis and two brokers too."""
    project = Compose(profiles=("cluster",))
    yield project
    take_down(project)


@pytest.mark.docker
@pytest.mark.timeout(1200)
def test_compose_up_chat_restart_keep_history(docker_ready: float, compose: Compose, tmp_path: Path) -> None:
    # Not a skip when this machine cannot run it: a skipped test is a test we do not have.
    started = docker_ready
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


#: Every service `--profile cluster up` starts: the profile's, and the single
#: broker, which has no profile and so always starts.
CLUSTER_SERVICES = ("redis", "broker-a", "broker-b", "broker")


def until_ok(attempt: Callable[[], str], timeout: float) -> str:
    """``attempt()`` again until it stops failing (a broker still reconnecting to Redis), within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return attempt()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_cluster_profile_two_brokers_one_chat(docker_ready: float, cluster: Compose) -> None:
    started = docker_ready
    build_redis_image()
    step(f"{REDIS_IMAGE} built from the host's .debs", started)
    cluster.up = True
    cluster("up", "-d", "--build", timeout=900)
    step("--profile cluster up --build done", started)
    for service in CLUSTER_SERVICES:
        cluster.wait_healthy(service=service)
    step(f"{', '.join(CLUSTER_SERVICES)} healthy", started)

    # Redis: append-only file, fsynced before each reply, on the named volume.
    config = cluster("exec", "-T", "redis", "redis-cli", "config", "get", "append*", timeout=60).split()
    assert {"appendonly": "yes", "appendfsync": "always"}.items() <= dict(
        zip(config[::2], config[1::2], strict=True)
    ).items()
    mounts = json.loads(cluster.inspect("{{json .Mounts}}", "redis"))
    assert [(m["Type"], m["Name"], m["Destination"]) for m in mounts] == [
        ("volume", f"{cluster.project}_redis-data", "/data")
    ]
    # The cluster's brokers use the backplane, and keep nothing of their own:
    # /data is a tmpfs, not an anonymous volume left behind by every container.
    for service in ("broker-a", "broker-b"):
        assert json.loads(cluster.inspect("{{json .Mounts}}", service)) == []
        assert "store backplane redis://redis:6379/0" in cluster("logs", "--no-color", service, timeout=60)

    # bob on broker-b, alice on broker-a: one room, and alice's DM reaches bob.
    bob_proc = subprocess.Popen(
        [*zchat_command(), *cluster.flags("broker-b"), "--name", "bob", "--json"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        bob = LineReader(bob_proc)
        assert bob_proc.stdin is not None
        bob_proc.stdin.write("bob here, on broker-b\n")
        bob_proc.stdin.flush()
        mine = bob.wait_for(lambda e: e["type"] == "msg" and bool(e.get("own")))
        sent = events(
            cluster.zchat("--name", "alice", "--json", stdin="hi from a\n/msg bob psst\n", service="broker-a")
        )
        assert [e["text"] for e in sent if e["type"] == "msg" and e.get("from") == "alice"] == ["hi from a"]
        hi = bob.wait_for(lambda e: e["type"] == "msg" and e.get("from") == "alice")
        assert hi["text"] == "hi from a" and hi["room"] == mine["room"] and hi["seq"] > mine["seq"]
        dm = bob.wait_for(lambda e: e["type"] == "dm" and e.get("from") == "alice")
        assert (dm["to"], dm["text"]) == ("bob", "psst")
        bob_proc.stdin.close()
        assert bob_proc.wait(timeout=30) == 0, bob_proc.stderr.read() if bob_proc.stderr else ""
    finally:
        if bob_proc.poll() is None:
            bob_proc.kill()
            bob_proc.wait(timeout=10)
    step("alice on broker-a -> bob on broker-b: room message and DM", started)

    # The chat is in Redis's append-only file on its volume: a restart of Redis
    # keeps it. carol lists both brokers, as docs/docker.md says clients should;
    # until the brokers are back on Redis, her hello may be answered 'unavailable'.
    before = cluster.inspect("{{.State.StartedAt}}", "redis")
    cluster("restart", "redis", timeout=120)
    cluster.wait_healthy(after=before, service="redis")
    step("redis restarted, healthy", started)
    both = ",".join(f"{HOST}:{port}:{pub}" for port, pub in (cluster.ports["broker-a"], cluster.ports["broker-b"]))
    command = [*zchat_command(), "--host", both, "--name", "carol", "--backlog", "10", "--json"]
    backlog = events(until_ok(lambda: run(command, timeout=60), timeout=60))
    assert [(e["seq"], e["from"], e["text"]) for e in backlog if e["type"] == "msg"] == [
        (mine["seq"], "bob", "bob here, on broker-b"),
        (hi["seq"], "alice", "hi from a"),
    ]
    step(f"history kept across a Redis restart, read through --host {both}", started)
