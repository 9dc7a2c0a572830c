"""visprompt.eval.evaluate: the one evaluation loop, on any Backend (the trainer and `visprompt eval` use it)."""

import json
from pathlib import Path

import pytest

from visprompt.data.llava import LlavaRecord, save_llava_records
from visprompt.engine.backend import GenerationResult, SamplingParams
from visprompt.errors import VispromptError
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


def test_trainer_and_cli_evaluate_through_the_same_loop(monkeypatch, tmp_path, capsys):
    import visprompt.engine.loading
    from visprompt.cli.main import main
    from visprompt.eval import vqa
    from visprompt.train import trainer

    assert trainer.evaluate is evaluate
    batches = []
    real = vqa.generate_in_batches

    def counting(backend, conversations, batch_size, params):
        batches.append(len(conversations))
        return real(backend, conversations, batch_size, params)

    monkeypatch.setattr(vqa, "generate_in_batches", counting)
    monkeypatch.setattr("visprompt.eval.run.generate_in_batches", counting)
    evaluate(Scripted(["red", "yes", "3"]), RECORDS)
    backend = Scripted(["red", "no", "3"])
    monkeypatch.setattr(visprompt.engine.loading, "load_backend", lambda ref, device="cpu": backend)
    for name in ("x.png", "y.png"):
        (tmp_path / name).write_bytes(b"")
    records = [LlavaRecord(r.id, [str(tmp_path / p.lstrip("/")) for p in r.images], r.turns) for r in RECORDS]
    save_llava_records(records, tmp_path / "t.json")
    assert main(["eval", "--model", "some-model", "--data", str(tmp_path / "t.json"), "--max-records", "1"]) == 0
    assert batches == [3, 2]
    out = json.loads(capsys.readouterr().out)
    assert out["exact_match"] == 0.5 and out["items"] == 2 and out["model"] == "some-model"


# -- caption metrics: pycocoevalcap's scorers ---------------------------------------------------
# Three photos, five human captions each (written for this test in COCO's style), and a model's caption.
CAPTION_REFS = {
    "beach": [
        "A man rides a brown horse along a sandy beach.",
        "A person on horseback near the ocean waves.",
        "A man riding a horse on the beach at sunset.",
        "Horse and rider walking on the sand by the sea.",
        "A rider guides his horse across the wet sand.",
    ],
    "kitchen": [
        "A kitchen with white cabinets and a silver refrigerator.",
        "A clean kitchen with a stove, sink and fridge.",
        "White kitchen cupboards next to a stainless steel fridge.",
        "A small kitchen with an oven and a refrigerator.",
        "The kitchen has white cabinets and modern appliances.",
    ],
    "dogs": [
        "Two dogs are playing in the snow.",
        "A pair of dogs running through a snowy field.",
        "Two puppies play together outside in the snow.",
        "Dogs chasing each other in deep snow.",
        "Two brown dogs romp in the snow.",
    ],
}
CAPTION_PREDS = {
    "beach": "A man riding a horse on a beach.",
    "kitchen": "A kitchen with a refrigerator and white cabinets.",
    "dogs": "A cat sleeping on a couch.",
}


def coco_reference_scores(tokenize):
    """What pycocoevalcap's COCOEvalCap computes: tokenize references and predictions, then each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = tokenize({k: [{"caption": c} for c in v] for k, v in CAPTION_REFS.items()})
    res = tokenize({k: [{"caption": v}] for k, v in CAPTION_PREDS.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        "BLEU-4": bleu[3],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr-D": Cider().compute_score(gts, res)[0],
    }


def test_caption_metrics_are_pycocoevalcaps_numbers_without_java():
    pytest.importorskip("pycocoevalcap")
    from visprompt.eval.captions import caption_scores, python_ptb_tokenize

    ours = caption_scores(CAPTION_PREDS, CAPTION_REFS, use_java=False)
    ref = coco_reference_scores(lambda d: {k: [python_ptb_tokenize(c["caption"]) for c in v] for k, v in d.items()})
    assert set(ours.corpus) == {"BLEU-4", "ROUGE-L", "CIDEr-D"}
    for metric, value in ref.items():
        assert ours.corpus[metric] == pytest.approx(value, abs=1e-12)
    assert ours.corpus == pytest.approx({"BLEU-4": 0.4198, "ROUGE-L": 0.5340, "CIDEr-D": 1.2972}, abs=1e-4)
    assert ours.per_item["CIDEr-D"]["dogs"] < ours.per_item["CIDEr-D"]["beach"]  # the wrong caption scores lowest
    assert python_ptb_tokenize("The dog's toy isn't red.") == "the dog 's toy is n't red"


def test_caption_metrics_with_java_are_coco_evals_ptb_tokenizer_and_meteor():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from visprompt.eval.captions import caption_scores, java_available, python_ptb_tokenize

    if not java_available():
        pytest.skip("no Java: the PTB tokenizer and METEOR need it")
    ours = caption_scores(CAPTION_PREDS, CAPTION_REFS, use_java=True)
    ref = coco_reference_scores(PTBTokenizer().tokenize)
    for metric, value in ref.items():
        assert ours.corpus[metric] == pytest.approx(value, abs=1e-12)
    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in CAPTION_REFS.items()})
    res = {k: [python_ptb_tokenize(v)] for k, v in CAPTION_PREDS.items()}
    meteor = Meteor()
    try:
        assert ours.corpus["METEOR"] == pytest.approx(meteor.compute_score(gts, res)[0], abs=1e-6)
    finally:
        meteor.meteor_p.kill()
    # on plain sentences the Python tokenizer is the Java one
    assert gts == {k: [python_ptb_tokenize(c) for c in v] for k, v in CAPTION_REFS.items()}


# -- VQAv2 accuracy: the official script's rules --------------------------------------------------
def official_vqa_accuracy(prediction, answers):
    """GT-Vision-Lab/VQA's vqaEval.py `evaluate` for one question, transcribed with its data layout
    (annotator answers as dicts with answer ids, so leaving one out removes exactly that one)."""
    from visprompt.eval.vqa_accuracy import process_digit_article, process_punctuation

    gts = [{"answer": a.replace("\n", " ").replace("\t", " ").strip(), "answer_id": i} for i, a in enumerate(answers)]
    res = prediction.replace("\n", " ").replace("\t", " ").strip()
    res = process_digit_article(process_punctuation(res))
    if len({g["answer"] for g in gts}) > 1:
        for g in gts:
            g["answer"] = process_punctuation(g["answer"])
    accs = []
    for datum in gts:
        others = [g for g in gts if g != datum]
        accs.append(min(1, float(len([g for g in others if g["answer"] == res])) / 3))
    return float(sum(accs)) / len(accs)


VQA_CASES = [  # (prediction, the ten annotators' answers)
    ("yes", ["yes"] * 10),
    ("Yes.", ["yes"] * 9 + ["no"]),
    ("no", ["yes"] * 7 + ["no"] * 3),
    ("No!", ["no"] * 2 + ["yes"] * 8),
    ("Two", ["2"] * 4 + ["3"] * 6),
    ("two dogs", ["2 dogs"] * 3 + ["2"] * 7),
    ("The red one", ["red one"] * 5 + ["red"] * 5),
    ("a frisbee", ["frisbee"] * 10),
    ("dont know", ["don't know"] * 3 + ["unknown"] * 7),
    ("1,000", ["1000"] * 6 + ["many"] * 4),
    ("3.5", ["3.5"] * 10),
    ("red/white", ["red white"] * 4 + ["red"] * 6),
    ("none", ["0"] * 3 + ["nothing"] * 7),
    ("blue", ["green"] * 10),
    ("tennis racket", ["tennis racket", "racket", "tennis racquet", "racket", "tennis racket"] * 2),
]


@pytest.mark.parametrize("prediction,answers", VQA_CASES)
def test_vqa_accuracy_equals_the_official_script(prediction, answers):
    from visprompt.eval.vqa_accuracy import vqa_accuracy

    assert vqa_accuracy(prediction, answers) == official_vqa_accuracy(prediction, answers)


def test_vqa_accuracy_known_values_and_normalisation():
    from visprompt.eval.vqa_accuracy import normalize_vqa_answer, vqa_accuracy

    for matches, expected in ((0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)):
        assert vqa_accuracy("cat", ["cat"] * matches + ["dog"] * (10 - matches)) == pytest.approx(expected)
    assert normalize_vqa_answer("Yes.") == "yes"
    assert normalize_vqa_answer("The two dogs") == "2 dogs"
    assert normalize_vqa_answer("an apple") == "apple"
    assert normalize_vqa_answer("Dont know") == "don't know"
    assert normalize_vqa_answer("1,000") == "1000" and normalize_vqa_answer("3.5") == "3.5"
    assert normalize_vqa_answer("  Ten\t") == "10" and normalize_vqa_answer("none") == "0"
    assert vqa_accuracy("Red.", ["red"]) == 1.0 and vqa_accuracy("blue", ["red"]) == 0.0  # one reference


# -- run_evaluation: answers log, resume, reports, any backend -----------------------------------
def qa_records(tmp_path, n=6, captions=True):
    """VQA-style records (ten answers each, a question type) and caption records (five references)."""
    from PIL import Image

    records = []
    for i in range(n):
        image = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 30), (40 * i, 100, 200)).save(image)
        answers = ["yes"] * 7 + ["no"] * 3 if i % 2 else ["2"] * 5 + ["3"] * 5
        question = "Is it blue?" if i % 2 else "How many <b>shapes</b>?"
        records.append(
            LlavaRecord(
                f"q{i}",
                [str(image)],
                [(f"<image>\n{question}", answers[0])],
                extra={"answers": answers, "question_type": "is it" if i % 2 else "how many"},
            )
        )
    for key, refs in CAPTION_REFS.items() if captions else ():
        records.append(
            LlavaRecord(
                f"c-{key}",
                [str(tmp_path / "img0.png")],
                [("<image>\nDescribe the photo.", refs[0])],
                extra={"references": refs, "question_type": "caption"},
            )
        )
    return records


class Counting(Scripted):
    """Answers every question with a fixed reply per question text; counts what it was asked."""

    def __init__(self, fail_after: int | None = None):
        super().__init__([])
        self.asked, self.fail_after = 0, fail_after

    def generate(self, conversations, params):
        if self.fail_after is not None and self.asked >= self.fail_after:
            raise KeyboardInterrupt
        self.asked += len(conversations)
        out = []
        for conv in conversations:
            text = " ".join(p.get("text", "") for p in conv[-1]["content"])
            reply = "yes" if "blue" in text else "Two" if "many" in text else CAPTION_PREDS["beach"]
            out.append(GenerationResult(reply, "stop", 1, 1))
        return out


def test_eval_writes_answers_and_reports_by_question_type(tmp_path):
    pytest.importorskip("pycocoevalcap")
    from visprompt.eval import run_evaluation

    records = qa_records(tmp_path)
    report = run_evaluation(Counting(), records, output=tmp_path / "out", batch_size=4, model_name="m")
    assert report["items"] == 9 and report["asked"] == 9 and report["by"] == "question_type"
    vqa = report["tasks"]["vqa"]
    assert vqa["items"] == 6 and vqa["exact_match"] == 1.0
    assert vqa["vqa_accuracy"] == pytest.approx((3 * 1.0 + 3 * 1.0) / 6)  # 7 and 5 annotators agree
    assert set(report["tasks"]["caption"]) >= {"BLEU-4", "ROUGE-L", "CIDEr-D"}
    assert set(report["groups"]) == {"caption", "how many", "is it"}
    assert report["groups"]["how many"]["vqa"]["items"] == 3
    assert report["worst"][0]["metric"] == "CIDEr-D"  # the captions all say "a man riding a horse"
    out = tmp_path / "out"
    lines = (out / "answers.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f"q{i}#0" for i in range(6)] + [
        f"c-{k}#0" for k in CAPTION_REFS
    ]
    assert json.loads((out / "report.json").read_text())["tasks"] == report["tasks"]
    md = (out / "report.md").read_text()
    assert "## By question_type" in md and "| question_type (vqa) |" in md and "| how many | 3 | 1.0000 |" in md
    page = (out / "report.html").read_text()
    assert "How many &lt;b&gt;shapes&lt;/b&gt;?" in page and "<b>shapes" not in page
    assert page.count('src="data:image/png;base64,') == len(report["worst"])
    by_kind = run_evaluation(Counting(), records, by="nope")["groups"]
    assert list(by_kind) == ["-"]


def test_resume_asks_only_unanswered_questions_and_never_again(tmp_path):
    from visprompt.eval import run_evaluation
    from visprompt.eval.answers import read_answers

    records = qa_records(tmp_path, captions=False)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # interrupted after two batches of 2
        run_evaluation(Counting(fail_after=4), records, output=out, batch_size=2, model_name="m")
    with open(out / "answers.jsonl", "ab") as f:  # and killed while writing a line
        f.write(b'{"id": "q4#0", "answ')
    assert len(read_answers(out / "answers.jsonl")) == 4
    backend = Counting()
    resumed = run_evaluation(backend, records, output=out, resume=True, batch_size=2, model_name="m")
    assert backend.asked == 2 and resumed["asked"] == 2
    lines = (out / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 6 and len({json.loads(line)["id"] for line in lines}) == 6
    again = Counting()
    assert run_evaluation(again, records, output=out, resume=True, model_name="m")["asked"] == 0 and again.asked == 0
    fresh = run_evaluation(Counting(), records, model_name="m")
    assert {k: v for k, v in resumed.items() if k != "asked"} == {k: v for k, v in fresh.items() if k != "asked"}
    with pytest.raises(VispromptError, match="another run"):
        run_evaluation(Counting(), records, output=out, resume=True, model_name="other")
    with pytest.raises(VispromptError, match="nothing to resume"):
        run_evaluation(Counting(), records, output=tmp_path / "empty", resume=True, model_name="m")


def test_cli_eval_resume_and_one_line_errors(tmp_path, monkeypatch, capsys):
    import visprompt.engine.loading
    from visprompt.cli.main import main

    save_llava_records(qa_records(tmp_path, captions=False), tmp_path / "split.json")
    backend = Counting()
    monkeypatch.setattr(visprompt.engine.loading, "load_backend", lambda ref, device="cpu": backend)
    args = ["eval", "--model", "m", "--data", str(tmp_path / "split.json"), "--output", str(tmp_path / "o")]
    assert main(args) == 0 and backend.asked == 6
    assert main([*args, "--resume"]) == 0 and backend.asked == 6  # nothing asked again
    capsys.readouterr()
    assert main(["eval", "--model", "m", "--data", str(tmp_path / "split.json"), "--resume"]) == 2
    assert capsys.readouterr().err == "error: --resume needs --output (the folder holding the answers so far)\n"


def test_cli_eval_reads_the_training_formats_imagefolder_and_coco(tmp_path, monkeypatch, capsys):
    """`visprompt eval --data` reads what training reads (data.records), not only LLaVA JSON; COCO's
    captions of one image are one question with every caption as a reference."""
    from PIL import Image

    import visprompt.engine.loading
    from visprompt.cli.main import main

    folder = tmp_path / "folder"
    folder.mkdir()
    for name, color in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 8), color).save(folder / name)
    rows = [
        {"file_name": "a.png", "question": "What color is it?", "answer": "red", "question_type": "color"},
        {"file_name": "b.png", "question": "What color is it?", "answer": "blue", "question_type": "color"},
    ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    coco = {
        "images": [{"id": 7, "file_name": "a.png"}, {"id": 9, "file_name": "b.png"}],
        "annotations": [
            {"id": 1, "image_id": 7, "caption": "a red square on a plain background"},
            {"id": 2, "image_id": 7, "caption": "a small red square"},
            {"id": 3, "image_id": 9, "caption": "a blue square"},
        ],
    }
    (folder / "captions.json").write_text(json.dumps(coco))

    class Colors:
        name = "colors"

        def __init__(self):
            self.asked = []

        def generate(self, conversations, params):
            self.asked += conversations
            images = [p["image"] for c in conversations for p in c[-1]["content"] if p.get("type") == "image"]
            assert len(images) == len(conversations) and all(Path(str(im)).is_file() for im in images)
            return [GenerationResult("red", "stop", 1, 1) for _ in conversations]

    backend = Colors()
    monkeypatch.setattr(visprompt.engine.loading, "load_backend", lambda ref, device="cpu": backend)
    assert main(["eval", "--model", "m", "--data", str(folder)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["items"], report["exact_match"], report["by"]) == (2, 0.5, "question_type")
    assert main(["eval", "--model", "m", "--data", str(folder / "captions.json"), "--output", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in (tmp_path / "o" / "answers.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["7#0", "9#0"]
    assert rows[0]["references"] == ["a red square on a plain background", "a small red square"]
    assert main(["eval", "--model", "m", "--data", str(folder / "captions.json"), "--data-format", "llava"]) == 2
    assert "COCO captions file" in capsys.readouterr().err


def test_any_backend_evaluates_own_model_and_starter(tmp_path, shapes_dir, tiny_model):
    pytest.importorskip("pycocoevalcap")  # the shapes split has caption questions
    from hf_tiny import make_tiny_starter

    from visprompt.eval import run_evaluation

    for name, backend in (("own", tiny_model), ("starter", make_tiny_starter())):
        report = run_evaluation(
            backend,
            shapes_dir / "test.json",
            output=tmp_path / name,
            max_records=2,
            max_new_tokens=4,
            model_name=name,
            use_java=False,  # the Java path is the caption tests'
        )
        assert report["items"] == sum(1 for line in (tmp_path / name / "answers.jsonl").read_text().splitlines())
        assert 0 <= report["tasks"]["vqa"]["vqa_accuracy"] <= 1 and (tmp_path / name / "report.html").is_file()
