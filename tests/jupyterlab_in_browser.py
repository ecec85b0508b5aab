"""Open every notebook in JupyterLab in a real (headless) Chromium, run all cells, check, and take screenshots.

nbval runs the notebooks' code; this runs them as a student does, in the browser, through JupyterLab's
own "run all cells" command, so that it also catches what only the front end sees: a widget that
does not render, an output JupyterLab cannot display, a kernel that dies. For each notebook it

1. opens it in JupyterLab (served on 127.0.0.1 from a temporary copy of notebooks/, so the committed
   files are never touched, in fast mode: DDIM_EDU_FAST=1, one torch thread),
2. runs all cells and waits until the kernel is idle and every code cell has run,
3. fails if a cell's output is an error, or if a notebook that builds ipywidgets shows none,
4. saves a screenshot of each walkthrough notebook as the run left it and of its last figure under docs/browser/.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``)
and ``pip install selenium jupyterlab ipywidgets`` (the ``notebooks`` extra and selenium). Run from
the repository root:

    python tests/jupyterlab_in_browser.py                 # all notebooks, screenshots in docs/browser/
    python tests/jupyterlab_in_browser.py 03 04            # the notebooks whose names start so

It exits 0 when every notebook passed and prints one line per notebook with its time.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"

# Read the open notebook's model: which code cells have run, and which outputs are errors.
STATE_JS = """
if (!window.jupyterapp) { return null; }  // the page is still loading
const panel = window.jupyterapp.shell.currentWidget;
if (!panel || !panel.content || !panel.content.model || !panel.sessionContext.session) { return null; }
const cells = [];
for (const cell of panel.content.model.cells) {
  if (cell.type !== 'code') continue;
  const outputs = [];
  for (let i = 0; i < cell.outputs.length; i++) { outputs.push(cell.outputs.get(i).toJSON()); }
  cells.push({count: cell.executionCount, source: cell.sharedModel.getSource().slice(0, 60), outputs: outputs});
}
const kernel = panel.sessionContext.session.kernel;
return {status: kernel ? kernel.status : 'none', cells: cells};
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(folder: Path, port: int, token: str) -> subprocess.Popen:
    settings = folder.parent / "lab-settings"  # the user's own JupyterLab settings stay out of the check
    notification = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false"}))  # no "news?" pop-up over the screenshots
    env = {**os.environ, "DDIM_EDU_FAST": "1", "OMP_NUM_THREADS": "1", "JUPYTERLAB_SETTINGS_DIR": str(settings)}
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
               "--LabApp.expose_app_in_browser=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # JupyterLab refuses to run as root without it (containers)
    lab = subprocess.Popen(command, env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return lab
        except OSError:
            if lab.poll() is not None:
                raise SystemExit(f"error: JupyterLab exited at start: {lab.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
    raise SystemExit("error: JupyterLab did not answer within 60 s")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        options.binary_location = chromium
    driver_path = shutil.which("chromedriver")
    return webdriver.Chrome(options=options, service=Service(driver_path) if driver_path else None)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what} (waited {timeout:.0f} s)")


def check_notebook(driver, port: int, token: str, name: str, shots: Path, timeout: float) -> list[str]:
    """Open, run all and check one notebook; return its problems (empty when it passed)."""
    from selenium.webdriver.common.by import By

    driver.get(f"http://127.0.0.1:{port}/lab/tree/{name}?token={token}&reset")
    wait_for(lambda: (driver.execute_script(STATE_JS) or {}).get("status") == "idle", 120,
             f"{name}: the kernel did not start")
    driver.execute_script("window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs'); return true;")
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells'); return true;")  # not awaited

    def finished():
        state = driver.execute_script(STATE_JS)
        done = state and state["status"] == "idle" and all(c["count"] is not None for c in state["cells"]
                                                          if c["source"].strip())
        return state if done else None

    time.sleep(2)
    state = wait_for(finished, timeout, f"{name}: the cells did not all run")
    problems = []
    for index, cell in enumerate(state["cells"]):
        for output in cell["outputs"]:
            if output.get("output_type") == "error":
                problems.append(f"code cell {index} ({cell['source']!r}…): {output.get('ename')}: {output.get('evalue')}")
    builds_widgets = any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                         for c in state["cells"] for o in c["outputs"])
    if builds_widgets and not driver.find_elements(By.CSS_SELECTOR, ".jupyter-widgets, .widget-inline-hbox, .widget-slider"):
        problems.append("the notebook builds ipywidgets but none rendered in the page")
    if Path(name).parent != Path("."):  # the solutions: checked, not pictured
        return problems
    stem = Path(name).stem
    driver.save_screenshot(str(shots / f"{stem}.png"))
    images = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")
    if images:
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", images[-1])
        time.sleep(0.5)
        driver.save_screenshot(str(shots / f"{stem}_last_figure.png"))
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefixes", nargs="*", help="check only the notebooks whose names start with these")
    parser.add_argument("--shots", type=Path, default=ROOT / "docs" / "browser", help="screenshot folder (default docs/browser/)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a notebook may run (default 600)")
    args = parser.parse_args(argv)
    try:
        import selenium  # noqa: F401
    except ImportError:
        print("error: selenium is not installed: pip install selenium jupyterlab ipywidgets", file=sys.stderr)
        return 2
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        print("error: no chromium found: apt-get install chromium chromium-driver", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ddim-edu-lab-") as tmp:
        folder = Path(tmp) / "notebooks"
        shutil.copytree(NOTEBOOKS, folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.ipynb"))
        names = [n for n in names if not args.prefixes or any(Path(n).name.startswith(p) for p in args.prefixes)]
        if not names:
            print(f"error: no notebook matches {args.prefixes}", file=sys.stderr)
            return 2
        args.shots.mkdir(parents=True, exist_ok=True)
        port, token = free_port(), secrets.token_hex(16)
        lab = start_lab(folder, port, token)
        driver = browser()
        failed = 0
        try:
            for name in names:
                start = time.perf_counter()
                try:
                    problems = check_notebook(driver, port, token, name, args.shots, args.timeout)
                except TimeoutError as err:
                    problems = [str(err)]
                status = "ok" if not problems else "FAILED"
                print(f"{status:6} {name} ({time.perf_counter() - start:.0f} s)", flush=True)
                for problem in problems:
                    print(f"       {problem}")
                failed += bool(problems)
        finally:
            driver.quit()
            os.killpg(lab.pid, signal.SIGTERM)
            lab.wait(timeout=30)
    print(f"{len(names) - failed} of {len(names)} notebooks ran in JupyterLab without errors; "
          f"screenshots in {args.shots.relative_to(ROOT) if args.shots.is_relative_to(ROOT) else args.shots}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
