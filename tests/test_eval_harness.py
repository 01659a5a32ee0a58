"""alignkit's lm-eval task YAMLs through lm-eval's own Python API, on the tiny model, offline."""
from __future__ import annotations

import json
import re
import sys
import types

import pytest

from alignkit.eval.harness import default_task_dir, run_harness, task_dir
from alignkit.resources import DATA


@pytest.fixture(autouse=True)
def parsers(monkeypatch):
    try:
        import alignkit.eval.parsers  # noqa: F401
    except ImportError:  # stand-in while alignkit/eval/parsers.py is absent
        m = types.ModuleType("alignkit.eval.parsers")
        m.parse_mmlu_response = lambda ex, t: (re.findall(r"correct answer is ([ABCD])", t) or [None])[0]
        m.parse_gsm8k_response = lambda t: (re.findall(r"-?\d[\d,]*(?:\.\d+)?", t) or [None])[-1]
        m.gsm8k_answer = lambda a: a.split("####")[-1].strip().replace(",", "")
        monkeypatch.setitem(sys.modules, "alignkit.eval.parsers", m)


def test_rendered_yamls_point_at_existing_bundled_files(tmp_path):
    out = task_dir(tmp_path)
    names = {p.name for p in task_dir().glob("*.yaml")}
    assert {"alignkit_gsm8k.yaml", "alignkit_mmlu.yaml", "alignkit_alpaca_eval.yaml", "alignkit_sst.yaml"} <= names
    assert {p.name for p in out.glob("*.yaml")} == names and (out / "utils.py").exists()
    for p in out.glob("*.yaml"):
        for path in re.findall(r"test: (/\S+)", p.read_text()):
            assert path.startswith(str(DATA)) and __import__("os").path.exists(path), (p.name, path)


@pytest.mark.slow
def test_custom_gsm8k_task_through_lm_eval_api(tiny_model_dir, tmp_path):
    out = run_harness(str(tiny_model_dir), ["alignkit_gsm8k"], tmp_path, limit=3, batch_size=3, device="cpu",
                      gen_kwargs={"max_gen_toks": 4})
    res = out["results"]["alignkit_gsm8k"]
    assert out["n_samples"]["alignkit_gsm8k"] == {"original": 1319, "effective": 3}
    samples = [json.loads(line) for line in (tmp_path / "samples_alignkit_gsm8k.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and [s["target"] for s in samples] == ["18", "3", "70000"]
    # exact_match is the mean of per-sample scores recomputed from the raw responses
    from alignkit.eval.parsers import parse_gsm8k_response
    from alignkit.eval.tasks.gsm8k import numbers_equal

    again = [numbers_equal(parse_gsm8k_response(s["filtered_resps"][0]), s["target"]) for s in samples]
    assert res["exact_match,none"] == pytest.approx(sum(again) / 3)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["device"] == "cpu" and "device" not in saved["config"]["model_args"]


# -------------------------------------------------------------------------- generated from the task specs
def _load_yaml(path):
    """A generated YAML as data (``!function utils.x`` -> the string ``"!function utils.x"``)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))
    return yaml.load(path.read_text(), Loader=Loader)


def test_no_hand_kept_yaml_ships():
    """The lm-eval YAMLs are generated from the specs; the package folder holds only the hooks."""
    from alignkit.eval import harness

    assert sorted(p.name for p in harness.UTILS.parent.iterdir() if p.suffix in (".yaml", ".py")) == ["utils.py"]


def test_generated_yaml_matches_the_runner_task(tmp_path):
    """Stop strings, token cap and metric: the values of the shipped hand-kept YAMLs (written out here by
    hand), and the runner Task's own sampling params (zero-shot style)."""
    from alignkit.eval.tasks import get_task

    out = task_dir(tmp_path)
    shipped = {"gsm8k": (256, "exact_match"), "mmlu": (128, "acc"), "alpaca_eval": (512, "output_chars"),
               "sst": (256, "output_chars"), "over_refusal": (128, "keyword_refusal")}
    for name, (max_tokens, metric) in shipped.items():
        path = out / (f"alignkit_{name}_anatomy.yaml" if name == "mmlu" else f"alignkit_{name}.yaml")
        cfg = _load_yaml(path)
        params = get_task(name).sampling_params("zero_shot")
        assert cfg["generation_kwargs"] == {"until": ["# Query:"], "do_sample": False, "temperature": 0.0,
                                            "max_gen_toks": max_tokens}, name
        assert (params.stop, params.max_new_tokens, params.temperature) == (["# Query:"], max_tokens, 0.0), name
        assert cfg["metric_list"][0]["metric"] == metric
        assert cfg["doc_to_text"] == "!function utils.doc_to_text"
        assert cfg["dataset_kwargs"]["alignkit_task"] == name
    group = _load_yaml(out / "alignkit_mmlu.yaml")
    assert group["task"] == ["alignkit_mmlu_abstract_algebra", "alignkit_mmlu_anatomy",
                             "alignkit_mmlu_college_computer_science", "alignkit_mmlu_high_school_geography"]


def test_task_dir_default_folder_is_rewritten_and_pruned(tmp_path, monkeypatch):
    from alignkit.eval import harness

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    folder = harness.task_dir()
    assert folder.is_absolute() and str(folder).startswith(str(tmp_path / "cache")) and folder.name == "lm_eval_tasks"
    assert default_task_dir() == folder
    (folder / "alignkit_gone.yaml").write_text("task: alignkit_gone\n")
    (folder / "mine.yaml").write_text("task: mine\n")
    (folder / "alignkit_gsm8k.yaml").write_text("edited by hand\n")
    assert harness.task_dir() == folder
    assert not (folder / "alignkit_gone.yaml").exists() and (folder / "mine.yaml").exists()
    assert (folder / "alignkit_gsm8k.yaml").read_text().startswith("# alignkit_gsm8k: GSM8K")


def test_lm_eval_loads_the_tasks_from_any_directory(tmp_path, monkeypatch):
    """lm-eval's own TaskManager, cwd an unrelated folder: docs, prompt and scores are the runner Task's."""
    import csv

    from lm_eval.tasks import TaskManager, get_task_dict

    from alignkit import resources
    from alignkit.eval.tasks import GSM8K, MMLU

    folder = task_dir(tmp_path / "tasks")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tasks = get_task_dict(["alignkit_gsm8k", "alignkit_mmlu_anatomy"],
                          TaskManager(include_path=str(folder), include_defaults=False))
    gsm8k = tasks["alignkit_gsm8k"]
    docs = gsm8k.test_docs()
    lines = resources.data_path("gsm8k", "test.jsonl").read_text().splitlines()
    assert len(docs) == len(lines) == 1319
    first = json.loads(lines[0])
    assert gsm8k.doc_to_target(docs[0]) == "18" and docs[0]["question"] == first["question"]
    body = f"{first['question']}\nAnswer:"
    assert gsm8k.doc_to_text(docs[0]) == resources.prompt("zero_shot_system_prompt").replace("{instruction}", body)
    assert gsm8k.doc_to_text(docs[0]) == GSM8K().format_prompt(GSM8K().load(1)[0], "zero_shot")
    assert gsm8k.process_results(docs[0], ["She makes 9 * 2 = $18.\n```"]) == {"exact_match": 1.0}
    assert gsm8k.process_results(docs[0], ["It is 17."]) == {"exact_match": 0.0}

    anatomy = tasks["alignkit_mmlu_anatomy"]
    rows = list(csv.reader(resources.data_path("mmlu", "test", "anatomy_test.csv").open(encoding="utf-8")))
    docs = anatomy.test_docs()
    assert len(docs) == len(rows) and docs[0]["answer"] == rows[0][5]
    assert anatomy.doc_to_text(docs[0]) == MMLU().format_prompt(
        next(e for e in MMLU().load() if e["id"] == "anatomy/1"), "zero_shot")
    assert anatomy.process_results(docs[0], [f"The correct answer is {rows[0][5]}."]) == {"acc": 1.0}
