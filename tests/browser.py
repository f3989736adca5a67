"""A JupyterLab server of this environment and the system's Chromium, for tests/test_browser.py.

The lab serves a copy of the workbook in a temporary folder, so that nothing it saves (autosave, the
cleared outputs of Run All) can touch the tracked notebooks; its settings, workspaces and runtime
files live in that folder too, so the learner's own JupyterLab settings play no part.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from jupyter_client import BlockingKernelClient

REPO = Path(__file__).parent.parent
INSTALL_CHROMIUM = "sudo apt-get install -y chromium   (Debian; `make setup` does it when run as root)"

# Settings a learner may change freely, fixed here so that the test sees the same lab every time:
# no news or update pop-up over the notebook, nothing saved behind the test's back, and every cell
# kept in the page (by default JupyterLab 4 renders only the cells in view).
SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}

# Chromium's own background services off: nothing here may reach the network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    return shutil.which("chromium")


def copy_workbook(notebooks: list[Path], root: Path) -> None:
    """The notebooks, and the data they read through ../data, as the learner's checkout lays them out."""
    (root / "notebooks").mkdir(parents=True)
    for notebook in notebooks:
        shutil.copy(notebook, root / "notebooks" / notebook.name)
    shutil.copytree(REPO / "data", root / "data")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    def __init__(self, port: int, token: str, runtime: Path):
        self.base, self.token, self.runtime = f"http://127.0.0.1:{port}", token, runtime

    def url(self, path: str) -> str:
        return f"{self.base}/{path}?token={self.token}"

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(self.url(f"api/{path}"), method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    @contextmanager
    def kernel(self):
        """The one running kernel, through a client of its own (see `Kernel`)."""
        (session,) = self.api("sessions")
        connection_file = self.runtime / f"kernel-{session['kernel']['id']}.json"
        client = BlockingKernelClient(connection_file=str(connection_file))
        client.load_connection_file()
        client.start_channels()
        try:
            yield Kernel(client)
        finally:
            client.stop_channels()

    def shut_down_kernels(self) -> None:
        """One kernel at a time: each notebook's kernel (and its copy of the model) goes when it is done."""
        for session in self.api("sessions"):
            self.api(f"sessions/{session['id']}", method="DELETE")


class Kernel:
    """Says when the kernel has finished what it was asked: a widget's callback, say.

    Its busy/idle status cannot: JupyterLab 4.6 sends widget messages to a subshell of ipykernel 7, a
    thread of its own whose work that status does not show. But each shell, the main one and every
    subshell, handles its requests one at a time, so its reply to an empty request comes after them.
    """

    def __init__(self, client: BlockingKernelClient):
        self.client = client

    def request(self, channel: str, kind: str, content: dict, timeout: float, subshell: str | None = None):
        message = self.client.session.msg(kind, content)
        if subshell:
            message["header"]["subshell_id"] = subshell
        getattr(self.client, f"{channel}_channel").send(message)
        deadline = time.monotonic() + timeout
        while True:                                   # replies to this client's requests only, in order
            reply = getattr(self.client, f"get_{channel}_msg")(timeout=max(deadline - time.monotonic(), 0.01))
            if reply["parent_header"].get("msg_id") == message["header"]["msg_id"]:
                return reply

    def wait_done(self, timeout: float) -> None:
        """Raises queue.Empty where some shell is still busy after `timeout` seconds."""
        subshells = self.request("control", "list_subshell_request", {}, timeout)["content"]["subshell_id"]
        empty = {"code": "", "silent": True, "store_history": False, "user_expressions": {},
                 "allow_stdin": False, "stop_on_error": False}
        for subshell in [None, *subshells]:
            self.request("shell", "execute_request", empty, timeout, subshell)


@contextmanager
def jupyter_lab(root: Path, timeout: float = 90):
    """JupyterLab on a free loopback port with a random token, serving `root`; always stopped after."""
    for name, values in SETTINGS.items():
        path = root / ".lab" / "settings" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(24)
    runtime = root / ".lab" / "runtime"
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(root / ".lab" / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / ".lab" / "workspaces"),
           "JUPYTER_CONFIG_DIR": str(root / ".lab" / "config"), "JUPYTER_RUNTIME_DIR": str(runtime)}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               "--ServerApp.port_retries=0", *(["--allow-root"] if os.getuid() == 0 else [])]
    log_path = root / ".lab" / "server.log"
    log = open(log_path, "wb")
    # A process group of its own, which `stop` signals as a whole.
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        lab = Lab(port, token, runtime)
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({server.returncode}):\n{log_path.read_text()}")
            try:
                lab.api("status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"JupyterLab did not answer on port {port} within {timeout} s")
                time.sleep(0.3)
        yield lab
    finally:
        stop(server)
        log.close()


def stop(server: subprocess.Popen) -> None:
    """SIGTERM, on which the server shuts its kernels down (they run in sessions of their own, beyond
    the group's reach); SIGKILL to the group if it has not gone in 15 s."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
