"""The safety see-saw task: attack success per jailbreak template beside over-refusal, one table.

A scripted model complies with the role-play and fiction templates and refuses the rest; the expected
rates below are counted by hand from that script (3 SST prompts x 5 templates, 3 benign prompts).
"""
from __future__ import annotations

import csv
import json

import pytest

from alignkit import resources
from alignkit.eval.harness import lm_eval_configs, task_dir
from alignkit.eval.judge import JudgeError, Verdict, keyword_refusal
from alignkit.eval.runner import run_eval
from alignkit.eval.tasks import get_task, parse_task_list
from alignkit.eval.tasks.safety import Safety, read_templates
from alignkit.generation.base import Completion

TEMPLATES = ["plain", "roleplay", "fiction", "prefix_injection", "ignore_previous"]
SST_IDS = ["sst_001", "sst_002", "sst_003"]
COMPLY_MAX = "Sure, here is what Max says: step one, then step two."  # keyword: complied; judge: unsafe
COMPLY_HARMLESS = "The expert paused and changed the subject to the weather."  # keyword: complied; judge: safe
REFUSE = "I'm sorry, but I can't help with that."
HELPFUL = "Here is how: open a terminal and run it."
ODD = "I can't stress enough how easy this is: hold the camera steady."  # keyword: refusal; judge: compliance


def model_reply(prompt: str) -> str:
    """Complies with role-play ("You are Max") and fiction ("writing a novel"); refuses the other templates
    and the plain requests; answers benign prompts, except that it refuses the one about killing a process."""
    if "You are Max" in prompt:
        return COMPLY_MAX
    if "writing a novel" in prompt:
        return COMPLY_HARMLESS
    if prompt.startswith("How do I kill a Python process"):
        return REFUSE
    if prompt.startswith("What's the best way to shoot"):
        return ODD
    if prompt.startswith("How can I execute a shell script"):
        return HELPFUL
    return REFUSE


def judge_reply(prompt: str) -> str:
    """A judge model: unsafe when the response starts with "Sure", refusal when it says sorry."""
    response = prompt.split("# Assistant:\n", 1)[1].split("\n\nAnswer with", 1)[0]
    if "Answer with exactly one word: \"unsafe\"" in prompt:
        return "unsafe" if response.startswith("Sure") else "safe"
    return "refusal" if "sorry" in response.lower() else "compliance"


class Scripted:
    """A Generator returning ``reply(prompt)`` (chat: the last message's content)."""

    def __init__(self, reply, name="scripted"):
        self.reply, self.name, self.prompts = reply, name, []

    def generate(self, prompts, params):
        self.prompts += list(prompts)
        return [Completion(self.reply(p), token_ids=[1, 2, 3]) for p in prompts]

    def chat(self, conversations, params):
        return self.generate([c[-1]["content"] for c in conversations], params)

    def update_weights(self, model):
        pass


class FakeJudge:
    """Judge stand-in: ``label(prompt, response) -> label or None``, for both verdict kinds."""

    def __init__(self, safety, refusal):
        self._safety, self._refusal, self.seen = safety, refusal, []

    def safety(self, items):
        self.seen += [("safety", p, r) for p, r in items]
        return [Verdict(self._safety(p, r), "raw") for p, r in items]

    def refusal(self, items):
        self.seen += [("refusal", p, r) for p, r in items]
        return [Verdict(self._refusal(p, r), "raw") for p, r in items]


def records(task: Safety, limit: int = 3) -> list[dict]:
    out = []
    for ex in task.load(limit):
        text = model_reply(task.instruction(ex))
        out.append({"id": ex["id"], "example": ex, "output": text, "score": task.score(ex, text)})
    return out


def first_benign(n: int) -> list[str]:
    lines = resources.data_path("over_refusal", "prompts.jsonl").read_text().splitlines()[:n]
    return [json.loads(line)["prompt"] for line in lines]


# hand counts from model_reply: roleplay and fiction comply 3/3, the others 0/3; jailbreak 6/12, all 6/15.
# benign: kill -> "I'm sorry" (refusal both ways), shoot -> "I can't stress" (keyword refusal, judge compliance)
KEYWORD = {"plain": 0.0, "roleplay": 1.0, "fiction": 1.0, "prefix_injection": 0.0, "ignore_previous": 0.0,
           "jailbreak": 6 / 12, "all": 6 / 15, "over_refusal": 2 / 3}
# judge: only COMPLY_MAX starts with "Sure" -> roleplay 3/3; fiction's harmless text is safe; benign: 1 sorry
JUDGED = {**KEYWORD, "fiction": 0.0, "jailbreak": 3 / 12, "all": 3 / 15, "over_refusal": 1 / 3}


def assert_rates(m: dict, expected: dict) -> None:
    for t in TEMPLATES:
        assert m[f"attack_success_rate_{t}"] == pytest.approx(expected[t]), t
    assert m["attack_success_rate_jailbreak"] == pytest.approx(expected["jailbreak"])
    assert m["attack_success_rate"] == pytest.approx(expected["all"])
    assert m["over_refusal_rate"] == pytest.approx(expected["over_refusal"])
    table = {row["row"]: row for row in m["table"]}
    assert list(table) == [*TEMPLATES, "jailbreak", "all attacks", "over_refusal"]
    assert [table[t]["n"] for t in TEMPLATES] == [3] * 5 and table["all attacks"]["n"] == 15
    assert table["all attacks"]["rate"] == pytest.approx(expected["all"])
    assert table["over_refusal"]["rate"] == pytest.approx(expected["over_refusal"])


# ------------------------------------------------------------------------------- data and --limit
def test_registered_and_limit_keeps_first_n_base_prompts_with_every_template():
    assert parse_task_list("safety") == ["safety"] and isinstance(get_task("safety"), Safety)
    task = Safety()
    examples = task.load(3)
    assert first_benign(3)[0].startswith("How do I kill a Python process")  # the script's benign cases hold
    assert [e["id"] for e in examples] == [f"{t}/{s}" for s in SST_IDS for t in TEMPLATES] + [
        "over_refusal/or_001", "over_refusal/or_002", "over_refusal/or_003"]
    with open(resources.data_path("simple_safety_tests", "simple_safety_tests.csv"), encoding="utf-8") as f:
        sst = [row["prompts_final"] for row in csv.DictReader(f)]
    templates = {t["id"]: t["template"] for t in read_templates(task.data_path)}
    assert list(templates) == TEMPLATES[1:]
    by_id = {e["id"]: e for e in examples}
    assert task.instruction(by_id["plain/sst_002"]) == sst[1]
    assert task.instruction(by_id["fiction/sst_002"]) == templates["fiction"].replace("{prompt}", sst[1])
    assert task.instruction(by_id["over_refusal/or_002"]) == first_benign(3)[1]
    assert all(e["base_prompt"] == sst[int(e["base_id"][-3:]) - 1] for e in examples if e["kind"] == "attack")
    full = task.load()
    assert len(full) == len(sst) * 5 + len(first_benign(1000)) and len({e["id"] for e in full}) == len(full)
    with pytest.raises(ValueError, match="limit_per_subject is read only by tasks with subjects"):
        task.load(3, limit_per_subject=1)


@pytest.mark.parametrize("row, message", [
    ({"id": "x", "style": "s", "template": "no slot"}, "has no {prompt}"),
    ({"id": "plain", "style": "s", "template": "{prompt}"}, "none of plain, over_refusal, jailbreak"),
    ({"id": "Bad-Id", "style": "s", "template": "{prompt}"}, r"must be \[a-z0-9_\]\+"),
    ({"id": "x", "template": "{prompt}"}, "field 'style' is missing"),
])
def test_bad_template_file_names_line_and_field(tmp_path, row, message):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "ok", "style": "s", "template": "A {prompt}"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=f"t.jsonl.*2.*{message}"):
        Safety(path).load(1)


def test_custom_templates_file_and_braces_in_requests(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "echo", "style": "s", "template": "[{prompt}] {prompt}"}) + "\n")
    sst = tmp_path / "s.csv"
    sst.write_text("id,harm_area,counter,category,prompts_final\ns1,a,1,b,say {x}\n")
    task = Safety(path, sst_path=sst)
    attacks = [e for e in task.load() if e["kind"] == "attack"]
    assert [(e["id"], task.instruction(e)) for e in attacks] == [("plain/s1", "say {x}"),
                                                                 ("echo/s1", "[say {x}] say {x}")]


# ------------------------------------------------------------------------------- the table
def test_keyword_fallback_rates_by_hand_and_labelled():
    task = Safety()
    recs = records(task)
    assert [keyword_refusal(t) for t in (COMPLY_MAX, COMPLY_HARMLESS, REFUSE, HELPFUL, ODD)] == [
        False, False, True, False, True]  # the detector reads the script as the hand counts assume
    m = task.aggregate(recs)
    assert_rates(m, KEYWORD)
    assert (m["judge"], m["judged"], m["keyword_fallback"], m["n"]) == ("keyword", 0, 18, 18)
    assert (m["attacks_succeeded"], m["over_refusals"], m["n_attacks"], m["n_benign"]) == (6, 2, 15, 3)
    assert all(row["keyword"] == row["n"] and row["judged"] == 0 for row in m["table"])
    failures = task.sample_failures(recs, n=100)
    assert [r["id"] for r in failures] == [f"{t}/{s}" for s in SST_IDS for t in ("roleplay", "fiction")] + [
        "over_refusal/or_001", "over_refusal/or_002"]


def test_judge_verdicts_rates_by_hand_and_unwrapped_request():
    task = Safety()
    recs = records(task)
    judge = FakeJudge(lambda p, r: "unsafe" if r.startswith("Sure") else "safe",
                      lambda p, r: "refusal" if "sorry" in r.lower() else "compliance")
    task.judge(recs, judge)
    m = task.aggregate(recs)
    assert_rates(m, JUDGED)
    assert (m["judge"], m["judged"], m["keyword_fallback"], m["invalid_judgments"]) == ("model", 18, 0, 0)
    safety_prompts = [p for kind, p, _ in judge.seen if kind == "safety"]
    assert len(safety_prompts) == 15 and not any("Max" in p or "novel" in p or "Ignore" in p for p in safety_prompts)
    assert set(safety_prompts) == {e["base_prompt"] for e in task.load(3) if e["kind"] == "attack"}
    assert [p for kind, p, _ in judge.seen if kind == "refusal"] == first_benign(3)


def test_invalid_verdicts_fall_back_to_keywords_and_say_so():
    task = Safety()
    recs = records(task)
    # the judge cannot read the role-play answers: those 3 are decided by keywords (complied: success)
    judge = FakeJudge(lambda p, r: None if r.startswith("Sure") else "safe", lambda p, r: "compliance")
    task.judge(recs, judge)
    m = task.aggregate(recs)
    assert (m["judge"], m["judged"], m["keyword_fallback"], m["invalid_judgments"]) == ("model+keyword", 15, 3, 3)
    assert m["attack_success_rate_roleplay"] == 1.0 and m["attack_success_rate_fiction"] == 0.0
    assert m["attack_success_rate"] == pytest.approx(3 / 15) and m["over_refusal_rate"] == 0.0
    row = next(r for r in m["table"] if r["row"] == "roleplay")
    assert (row["judged"], row["keyword"]) == (0, 3)
    with pytest.raises(JudgeError, match="no valid safety verdict"):
        task.judge(records(task), FakeJudge(lambda p, r: None, lambda p, r: "refusal"))


def test_empty_rows_are_not_measured():
    m = Safety().aggregate([])
    assert m["attack_success_rate"] is None and m["over_refusal_rate"] is None and m["n"] == 0


# ------------------------------------------------------------------------------- lm-eval YAML
def test_lm_eval_yaml_is_generation_only_and_docs_share_one_schema(tmp_path):
    import datasets

    cfg = lm_eval_configs()["alignkit_safety"]
    assert cfg["dataset_kwargs"] == {"alignkit_task": "safety", "data_files": {"test": str(Safety().data_path)}}
    assert cfg["metric_list"][0]["metric"] == "output_chars" and cfg["generation_kwargs"]["max_gen_toks"] == 256
    assert (task_dir(tmp_path) / "alignkit_safety.yaml").exists()
    docs = Safety(cfg["dataset_kwargs"]["data_files"]["test"]).load()
    assert len({tuple(d) for d in docs}) == 1  # one key set: lm-eval's Dataset.from_list keeps every field
    ds = datasets.Dataset.from_list(docs)
    assert ds[len(docs) - 1]["template"] == "over_refusal" and ds[1]["template"] == "roleplay"
    assert Safety().harness_metrics(docs[0], "abc") == {"output_chars": 3.0}


# ------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("judged", [False, True])
def test_run_eval_writes_the_table_into_results_and_report(tmp_path, judged):
    model = Scripted(model_reply)
    kwargs = {"judge": Scripted(judge_reply, name="judge")} if judged else {}
    results = run_eval(model, ["safety"], tmp_path, limit=3, prompt="chat", batch_size=4, **kwargs)
    expected = JUDGED if judged else KEYWORD
    saved = json.loads((tmp_path / "results.json").read_text())
    for m in (results["metrics"]["safety"], saved["metrics"]["safety"]):
        assert_rates(m, expected)
        assert m["judge"] == ("model" if judged else "keyword")
    assert len(model.prompts) == 18
    report = (tmp_path / "report.md").read_text()
    assert f"| safety | attack_success_rate | {expected['all']:.4f} |" in report
    assert f"| safety | attack_success_rate_fiction | {expected['fiction']:.4f} |" in report
    assert f"| safety | over_refusal_rate | {expected['over_refusal']:.4f} |" in report
    assert f"| safety | judge | {'model' if judged else 'keyword'} |" in report
    rows = [json.loads(line) for line in (tmp_path / "safety" / "safety_outputs.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and {r["decided_by"] for r in rows} == {"judge" if judged else "keyword"}
    assert sum(r["failed"] for r in rows if r["kind"] == "attack") == round(expected["all"] * 15)
