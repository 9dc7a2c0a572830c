"""visprompt.eval.evaluate: the one evaluation loop, on any Backend (the trainer and `visprompt eval` use it)."""

import json

from visprompt.data.llava import LlavaRecord, save_llava_records
from visprompt.engine.backend import GenerationResult, SamplingParams
from visprompt.eval import VQAReport, evaluate
from visprompt.eval.vqa import record_turn_conversations

RECORDS = [
    LlavaRecord("a", ["/x.png"], [("<image>\nWhat color is it?", "red"), ("Is it big?", "yes")]),
    LlavaRecord("b", ["/y.png"], [("How many?\n<image>", "three")]),
]


class Scripted:
    """A Backend that answers from a script and records what it was asked."""

    name = "scripted"

    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def generate(self, conversations, params):
        self.calls.append((conversations, params))
        return [GenerationResult(self.answers.pop(0), "stop", 1, 1) for _ in conversations]


def test_evaluate_asks_every_turn_through_the_backend_protocol_and_scores_it():
    backend = Scripted(["Red.", "no", "3"])
    report = evaluate(backend, RECORDS, batch_size=2, max_new_tokens=7)
    assert isinstance(report, VQAReport)
    assert (report.exact_match, report.total) == (2 / 3, 3)
    assert report.examples == [{"question": "Is it big?", "gold": "yes", "predicted": "no"}]
    asked = [c for convs, _ in backend.calls for c in convs]
    assert asked == [conv for rec in RECORDS for conv, _ in record_turn_conversations(rec)]
    assert [len(convs) for convs, _ in backend.calls] == [2, 1]
    assert all(params == SamplingParams(max_new_tokens=7) for _, params in backend.calls)


def test_evaluate_reads_a_llava_file_and_limits_records(tmp_path):
    for name in ("x.png", "y.png"):
        (tmp_path / name).write_bytes(b"")
    records = [LlavaRecord(r.id, [str(tmp_path / p.lstrip("/")) for p in r.images], r.turns) for r in RECORDS]
    save_llava_records(records, tmp_path / "test.json")
    report = evaluate(Scripted(["red", "yes"]), tmp_path / "test.json", max_records=1)
    assert (report.exact_match, report.total) == (1.0, 2)


def test_trainer_and_cli_evaluate_through_the_same_function(monkeypatch, tmp_path, capsys):
    import visprompt.engine.loading
    import visprompt.eval
    from visprompt.cli.main import main
    from visprompt.train import trainer

    assert trainer.evaluate is evaluate
    seen = {}

    def fake_evaluate(backend, records, **kwargs):
        seen.update(backend=backend, records=records, **kwargs)
        return VQAReport(exact_match=0.5, total=2)

    backend = Scripted([])
    monkeypatch.setattr(visprompt.engine.loading, "load_backend", lambda ref, device="cpu": backend)
    monkeypatch.setattr(visprompt.eval, "evaluate", fake_evaluate)
    assert main(["eval", "--model", "some-model", "--data", str(tmp_path / "t.json"), "--max-records", "3"]) == 0
    assert seen == {"backend": backend, "records": tmp_path / "t.json", "max_records": 3}
    assert json.loads(capsys.readouterr().out)["exact_match"] == 0.5
