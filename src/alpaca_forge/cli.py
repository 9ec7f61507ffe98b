"""The `alpaca-forge` command. Each subcommand lives in its own module; this file only wires flags.

Errors the user can fix (`UserError`) are printed as a message and a fix with exit status 2;
Ctrl-C exits with 130. Neither prints a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__
from .errors import UserError
from .models import BUILTIN_MODELS, DEFAULT_MODEL, DTYPES
from .prompts import FORMATS

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; shows a flag's default where it has a real one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        meaningful = not (d is None or d is False or d is argparse.SUPPRESS or d == [] or d == "")
        if meaningful and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return {int: "N", float: "X"}.get(action.type, action.dest.upper())


def _command(
    sub: argparse._SubParsersAction, name: str, summary: str, description: str
) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=description, formatter_class=_HelpFormatter)


def add_model_args(p: argparse.ArgumentParser, *, need_weights: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a built-in model ({', '.join(BUILTIN_MODELS)}), a local model folder, a .gguf file, "
        "or a Hugging Face id already in the local cache",
    )
    g.add_argument(
        "--format",
        choices=list(FORMATS),
        default=None,
        help="prompt format; default: the one saved with the model, else the model's chat template, else alpaca",
    )
    g.add_argument(
        "--system", default=None, help="system message for the chat format (default: the template's own)"
    )
    if need_weights:
        g.add_argument(
            "--dtype",
            choices=DTYPES,
            default="auto",
            help="weights dtype; auto = bf16 on a GPU that has it, else fp32",
        )
        g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def add_generation_args(p: argparse.ArgumentParser, *, temperature: float) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    g.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        help="0 = greedy (deterministic); higher = more varied",
    )
    g.add_argument(
        "--top-p", type=float, default=0.9, help="nucleus sampling threshold (ignored when greedy)"
    )
    g.add_argument("--seed", type=int, default=0, help="random seed, so sampled answers repeat")
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.1,
        help="above 1 discourages repeating earlier tokens (small models loop without it); 1 = off",
    )
    g.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop the answer at TEXT (repeatable); added to the prompt format's own stop strings",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alpaca-forge",
        description="Make instruction-following models the Stanford Alpaca way, offline-first.",
        epilog="Run `alpaca-forge COMMAND --help` for each command's flags and an example.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"alpaca-forge {__version__}")
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only results and errors (no progress or load messages)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="one of the commands below")

    p = _command(
        sub,
        "prompt",
        "print the exact prompt a model sees for an instruction",
        "Print the exact prompt string for one instruction (and optional input) to stdout, and nothing\n"
        "else, so you can check what the model sees.\n\n"
        "example:\n  alpaca-forge prompt --format alpaca --instruction 'Summarise this.' --input 'Some text.'",
    )
    p.add_argument(
        "--instruction", required=True, metavar="TEXT", help="the task, as in a record's 'instruction'"
    )
    p.add_argument("--input", default="", metavar="TEXT", help="optional context, as in a record's 'input'")
    add_model_args(p, need_weights=False)
    p.set_defaults(run=_run_prompt)

    p = _command(
        sub,
        "chat",
        "talk to a model in the terminal, answers streamed",
        "Chat with a model, answers streamed token by token. Multi-turn with the chat and\n"
        "user-assistant formats; the alpaca format answers each question on its own.\n"
        "In the chat: /reset forgets the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer.\n"
        "With stdin not a terminal, each input line is one question and only answers are printed.\n\n"
        "example:\n  alpaca-forge chat --model smollm2-135m-instruct --temperature 0.7",
    )
    add_model_args(p)
    add_generation_args(p, temperature=0.7)
    p.add_argument(
        "--no-stats", action="store_true", help="do not print tokens and tokens/s after each answer"
    )
    p.set_defaults(run=_run_chat)

    p = _command(
        sub,
        "infer",
        "answer every instruction of a file (JSONL out, resumable)",
        "Answer every instruction in a file and write one JSON line per answer with the\n"
        "instruction, input, output, model, prompt format and generation settings. Reads Alpaca\n"
        "records (JSON array or JSONL), seed tasks and evaluation tasks ({instruction, instances}).\n"
        "Running the same command again resumes: answers already in --output are skipped.\n\n"
        "example:\n  alpaca-forge infer --input examples/demo_instructions.jsonl --output out/predictions.jsonl",
    )
    p.add_argument(
        "--input", required=True, metavar="FILE", help="instructions: .json array or .jsonl (.gz too)"
    )
    p.add_argument(
        "--output", required=True, metavar="FILE", help="predictions, JSONL; appended to and resumed from"
    )
    add_model_args(p)
    add_generation_args(p, temperature=0.0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left-padded)")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N records")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming from --output")
    p.add_argument(
        "--print",
        dest="echo",
        action="store_true",
        help="also print each instruction and its answer to stdout",
    )
    p.set_defaults(run=_run_infer)

    _add_generate_command(sub)
    _add_data_commands(sub)
    _add_train_command(sub)
    return parser


def _add_generate_command(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "generate",
        "self-instruct: new instruction records from seed tasks and a teacher model",
        "Make new Alpaca records the self-instruct way: each request shows the teacher 3 seed tasks\n"
        "and asks for 20 more; candidates are parsed, filtered (length, blacklist, prefixes, first\n"
        "character) and dropped when their ROUGE-L F1 with any seed or accepted instruction is above\n"
        "0.7. Records are appended and flushed one by one: kill the run at any moment and run the\n"
        "same command again to resume. A summary (accepted, drops per filter, tokens, cost) is\n"
        "printed and written next to the output.\n\n"
        "examples:\n"
        "  # offline, with the embedded model as teacher (messy but real):\n"
        "  alpaca-forge generate --seeds seed_tasks.jsonl --output gen.jsonl --num-instructions 20\n"
        "  # any OpenAI-compatible server, 32 requests in flight, priced:\n"
        "  alpaca-forge generate --seeds seed_tasks.jsonl --output gen.jsonl --num-instructions 52000 \\\n"
        "      --teacher-url https://api.openai.com/v1 --teacher-model gpt-4o-mini --concurrency 32 \\\n"
        "      --price-prompt-per-1m 0.15 --price-completion-per-1m 0.60 --max-cost-usd 50",
    )
    p.add_argument(
        "--seeds", required=True, metavar="FILE", help="seed tasks (seed-task format or Alpaca records)"
    )
    p.add_argument(
        "--output", required=True, metavar="FILE", help="accepted records, JSONL; resumed from if it exists"
    )
    p.add_argument(
        "--num-instructions", type=int, required=True, help="stop once this many records are accepted"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the choice of demonstrations (request k always shows the same 3)",
    )
    g = p.add_argument_group("teacher")
    g.add_argument(
        "--teacher-url",
        metavar="URL",
        help="OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1; without it the teacher runs in this process",
    )
    g.add_argument(
        "--teacher-model",
        default=None,
        metavar="MODEL",
        help="with --teacher-url: the API's model name; without: a model as for --model elsewhere (default: smollm2-135m-instruct)",
    )
    g.add_argument(
        "--teacher-api",
        choices=["chat", "completions"],
        default=None,
        help="server: which endpoint (default chat); in-process: completions continues the prompt as plain "
        "text (default; small models follow the layout better), chat wraps it in the model's prompt format",
    )
    g.add_argument(
        "--teacher-key-env",
        default="OPENAI_API_KEY",
        metavar="NAME",
        help="environment variable holding the API key (never a flag, so it stays out of shell history)",
    )
    g.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests in flight at once (a server: 8-64; the in-process teacher: 1)",
    )
    g.add_argument("--timeout-s", type=float, default=120.0, help="one request's time limit, in seconds")
    g.add_argument(
        "--max-retries",
        type=int,
        default=6,
        help="retries of a failed request (429, 5xx, timeout), with exponential backoff and jitter",
    )
    g.add_argument("--max-tokens", type=int, default=3072, help="completion length limit per request")
    g.add_argument("--temperature", type=float, default=1.0, help="teacher sampling temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="teacher nucleus sampling")
    g = p.add_argument_group("cost")
    g.add_argument("--price-prompt-per-1m", type=float, default=0.0, help="USD per million prompt tokens")
    g.add_argument(
        "--price-completion-per-1m", type=float, default=0.0, help="USD per million completion tokens"
    )
    g.add_argument(
        "--max-cost-usd", type=float, default=None, help="send no new request once this much is spent"
    )
    g.add_argument(
        "--max-requests", type=int, default=None, help="send no more than this many requests in all"
    )
    g = p.add_argument_group("filters")
    g.add_argument("--min-words", type=int, default=4, help="drop instructions with fewer words")
    g.add_argument("--max-words", type=int, default=150, help="drop instructions with more words")
    g.add_argument(
        "--rouge-threshold",
        type=float,
        default=0.7,
        help="drop when ROUGE-L F1 with a pool instruction is above this",
    )
    g.add_argument(
        "--blacklist",
        default=None,
        metavar="WORDS",
        help="comma-separated words (whole word, any case) that drop an instruction; default: image, graph, picture, file, map, draw, plot, go to, video, audio, music, flowchart, diagram and plurals",
    )
    g.add_argument(
        "--banned-prefix",
        action="append",
        default=None,
        metavar="TEXT",
        help='drop instructions starting with TEXT (repeatable; default: "Write a program")',
    )
    p.set_defaults(run=_run_generate)


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = _command(
        sub,
        "data",
        "tools over Alpaca datasets: validate, stats, quality, clean, dedupe, split, convert",
        "Tools over Alpaca datasets (.json array or .jsonl, .gz too). Run `alpaca-forge data TOOL --help`.",
    )
    tools = data.add_subparsers(dest="tool", metavar="TOOL", help="one of the tools below")

    p = _command(
        tools,
        "validate",
        "check every record; report every problem with file, line and field",
        "Check every record (instruction, input, output) and report every problem at once, with\n"
        "file, line (or array index) and field, and a fix. Exit status 2 if any.\n\n"
        "example:\n  alpaca-forge data validate alpaca_data.json more.jsonl",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="datasets to check")
    p.set_defaults(run=_run_data_validate)

    p = _command(
        tools,
        "dedupe",
        "drop near-duplicates by ROUGE-L (exact, greedy in file order)",
        "Keep each record unless its ROUGE-L F1 with an earlier kept record is above the threshold\n"
        "(self-instruct's filter; scores identical to the rouge-score package). Writes the kept\n"
        "records, and the dropped ones with the record each collided with.\n\n"
        "example:\n  alpaca-forge data dedupe data.jsonl --output data.dedup.jsonl --threshold 0.7",
    )
    p.add_argument("file", metavar="FILE", help="the dataset")
    p.add_argument("--output", required=True, metavar="FILE", help="kept records (.json array or .jsonl)")
    p.add_argument(
        "--dropped",
        metavar="FILE",
        help="dropped records with their duplicate (default: OUTPUT's name + .dropped.jsonl)",
    )
    p.add_argument("--threshold", type=float, default=0.7, help="drop when ROUGE-L F1 is above this")
    p.add_argument(
        "--key",
        choices=["instruction", "instruction+input", "output"],
        default="instruction",
        help="which text is compared",
    )
    p.set_defaults(run=_run_data_dedupe)

    p = _command(
        tools,
        "split",
        "seeded train/validation split",
        "Split a dataset into DIR/train.jsonl and DIR/val.jsonl, at random but seeded; both keep\n"
        "the file's order.\n\nexample:\n  alpaca-forge data split data.jsonl --output-dir splits --val-size 0.05",
    )
    p.add_argument("file", metavar="FILE", help="the dataset")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where train.jsonl and val.jsonl go")
    p.add_argument(
        "--val-size", type=float, default=0.05, help="validation share (0 to 1) or count (1 or more)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for the split")
    p.set_defaults(run=_run_data_split)

    p = _command(
        tools,
        "convert",
        "Alpaca <-> chat messages <-> seed-task format",
        "Rewrite a dataset in another format. Input may be Alpaca records, chat `messages` (one\n"
        "exchange each), or seed/evaluation tasks; output is the --to format.\n\n"
        "example:\n  alpaca-forge data convert alpaca_data.json --to messages --output chat.jsonl",
    )
    p.add_argument("file", metavar="FILE", help="the dataset")
    p.add_argument("--to", required=True, choices=["alpaca", "messages", "seed"], help="output format")
    p.add_argument("--output", required=True, metavar="FILE", help="where to write (.json array or .jsonl)")
    p.set_defaults(run=_run_data_convert)

    p = _command(
        tools,
        "stats",
        "counts, share with input, length histograms (PNG)",
        "Print counts, the share of records with an input, word-length summaries and the most\n"
        "common first words; draw length histograms as a PNG.\n\n"
        "example:\n  alpaca-forge data stats data.jsonl --plot data.lengths.png --json data.stats.json",
    )
    p.add_argument("file", metavar="FILE", help="the dataset")
    p.add_argument(
        "--plot",
        metavar="PNG",
        help="where to draw the histograms (default: FILE's name + .lengths.png, here)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.set_defaults(run=_run_data_stats)

    checks = "empty_output, output_equals_input, truncated_output, refusal, noinput_leftover, non_english_start, near_duplicate"
    p = _command(
        tools,
        "quality",
        "report likely problems: refusals, truncation, leftovers, duplicates ...",
        f"Run every quality check ({checks}) and report counts and examples.\n\n"
        "example:\n  alpaca-forge data quality data.jsonl --report quality.json",
    )
    p.add_argument("file", metavar="FILE", help="the dataset")
    p.add_argument("--report", metavar="FILE", help="also write the report (counts and examples) as JSON")
    p.add_argument("--examples", type=int, default=3, help="examples shown per check")
    _add_near_duplicate_threshold(p)
    p.set_defaults(run=_run_data_quality)

    p = _command(
        tools,
        "clean",
        "remove what `quality` flags (checks configurable)",
        "Remove every record flagged by the chosen quality checks; the removed ones are written\n"
        "beside the output with the checks that flagged them.\n\n"
        "example:\n  alpaca-forge data clean data.jsonl --output clean.jsonl --checks refusal,empty_output,near_duplicate",
    )
    p.add_argument("file", metavar="FILE", help="the dataset")
    p.add_argument("--output", required=True, metavar="FILE", help="the records that pass")
    p.add_argument(
        "--checks", metavar="LIST", help=f"comma-separated checks to apply (default: all of {checks})"
    )
    _add_near_duplicate_threshold(p)
    p.set_defaults(run=_run_data_clean)

    p = _command(
        tools,
        "tokenize",
        "write the exact input_ids and labels training will use; --show prints masked vs trained",
        "Tokenise records exactly as `train` does (prompt format, masking, truncation that keeps\n"
        "the EOS) and write one JSON line per example, in input order, with input_ids and labels\n"
        "(-100 = masked, not learnt). --show N prints N examples with masked text dimmed (or in\n"
        "⟦brackets⟧ when not a terminal) and trained text bright, to check masking before paying\n"
        "for GPUs.\n\n"
        "example:\n  alpaca-forge data tokenize --model smollm2-135m-instruct train.jsonl --output ids.jsonl --show 2",
    )
    p.add_argument("file", metavar="FILE", help="the training records")
    p.add_argument(
        "--output", metavar="FILE", help="JSONL of {record, input_ids, labels}; omit to only --show"
    )
    p.add_argument(
        "--show", type=int, default=0, metavar="N", help="print the first N examples, masking visible"
    )
    p.add_argument("--max-seq-len", type=int, default=512, help="the training window in tokens")
    p.add_argument("--train-on-inputs", action="store_true", help="also learn the prompt tokens (as `train`)")
    add_model_args(p, need_weights=False)
    p.set_defaults(run=_run_data_tokenize)
    data.set_defaults(run=lambda args: _missing_tool(data))


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    from .train import _FIELDS

    p = _command(
        sub,
        "train",
        "supervised fine-tuning: full, LoRA or QLoRA; packed batches; resumable",
        "Fine-tune a causal LM on Alpaca records (HF Trainer + peft + accelerate). Settings come\n"
        "from --config FILE (YAML) and flags; flags win. The prompt is masked (only the response\n"
        "and its EOS are learnt), examples are packed into full rows without attending across\n"
        "each other, and checkpoints are written every --save-steps: after a crash or kill -9,\n"
        "run the same command with --resume. The output folder gets the model (or LoRA adapter),\n"
        "tokenizer, prompt format, train_summary.json, loss.png and TensorBoard logs.\n"
        "Several GPUs: `accelerate launch --config_file configs/accelerate/fsdp.yaml -m alpaca_forge train ...`.\n\n"
        "examples:\n"
        "  alpaca-forge train --data train.jsonl --output runs/smol --method lora --epochs 1\n"
        "  alpaca-forge train --config configs/smollm2-cpu.yaml\n"
        "  alpaca-forge train --config configs/smollm2-cpu.yaml --resume",
    )
    p.add_argument("--config", metavar="FILE", help="YAML file of settings (names as the flags, with _)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the last complete checkpoint in --output"
    )
    for name, f in _FIELDS.items():
        flag = "--" + name.replace("_", "-")
        t = str(f.type)
        kwargs: dict = {"default": None, "help": f.metadata.get("help", "")}
        if "bool" in t:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = (
                "LIST" if "list" in t else ("N" if "int" in t else ("X" if "float" in t else name.upper()))
            )
            if f.metadata.get("choices"):
                kwargs["choices"] = list(f.metadata["choices"])
                del kwargs["metavar"]  # argparse then shows the choices
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default not in (None, "", [], False):
            kwargs["help"] += f" (default: {','.join(default) if isinstance(default, list) else default})"
        p.add_argument(flag, dest=name, **kwargs)
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train import _FIELDS, resolve_config, run

    cfg = resolve_config(args.config, {name: getattr(args, name) for name in _FIELDS})
    result = run(cfg, resume=args.resume, progress=not args.quiet)
    s = result.summary
    _say(
        "trained %d steps in %.0f s: loss %s -> %s%s; padding %.1f%% of batch tokens",
        s["steps"],
        s["wall_time_s"],
        _fmt_loss(s["first_loss"]),
        _fmt_loss(s["last_loss"]),
        f", validation {s['last_eval_loss']:.4f}" if s.get("last_eval_loss") is not None else "",
        100 * s["padding_share"],
    )
    _say("model: %s (summary: train_summary.json, curve: loss.png)", result.output)
    return 0


def _fmt_loss(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _run_data_tokenize(args: argparse.Namespace) -> int:
    import sys as _sys

    from . import sft
    from .models import load_tokenizer
    from .records import read_records
    from .train import training_format

    if not args.output and not args.show:
        raise UserError(
            "nothing to do", "give --output FILE to write the examples, or --show N to print some"
        )
    records = read_records(args.file)
    tokenizer = load_tokenizer(args.model)
    fmt = training_format(args.model, args.format, args.system)
    examples, report = sft.tokenize_records(records, tokenizer, fmt, args.max_seq_len, args.train_on_inputs)
    if args.output:
        from .records import write_records

        write_records(
            args.output,
            ({"index": e.record, "input_ids": e.input_ids, "labels": e.labels} for e in examples),
        )
    color = _sys.stdout.isatty()
    for e in examples[: args.show]:
        print(
            f"--- record {e.record + 1}: {len(e.input_ids)} tokens, {e.trained_tokens} trained"
            + (" (response cut, EOS kept)" if e.truncated else "")
        )
        print(sft.describe_example(e, tokenizer, color))
    _say(
        "%s (format: %s)%s", report.summary(), fmt.name, f"; written to {args.output}" if args.output else ""
    )
    return 0


def _add_near_duplicate_threshold(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threshold", type=float, default=0.7, help="ROUGE-L F1 above which a record is a near-duplicate"
    )


def _missing_tool(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_USER_ERROR


# ---------------------------------------------------------------------------------------------
# Command bodies (imports inside, so `--help` stays fast)


def _format_from_args(args: argparse.Namespace):
    from .prompts import get_format

    return get_format(args.format, args.system) if args.format else None


def _with_system(fmt, system: str | None):
    """`--system` also applies when the format comes from the model rather than `--format`."""
    return type(fmt)(system=system) if system and fmt.system is None else fmt


def _settings_from_args(args: argparse.Namespace):
    from .generation import GenerationSettings

    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
    )


def _load(args: argparse.Namespace):
    from .models import load_model

    log = logging.getLogger("alpaca_forge")
    log.info("loading %s ...", args.model)
    lm = load_model(args.model, dtype=args.dtype, device=args.device, prompt_format=_format_from_args(args))
    lm.prompt_format = _with_system(lm.prompt_format, args.system)
    log.info(
        "loaded %s in %.1f s (%.1fM params, %s, %s, %s format)",
        lm.name,
        lm.load_s,
        lm.num_params / 1e6,
        lm.device,
        str(lm.model.dtype).removeprefix("torch."),
        lm.prompt_format.name,
    )
    return lm


def _run_prompt(args: argparse.Namespace) -> int:
    from .models import default_format_for, load_tokenizer, saved_format_of

    if not args.instruction.strip():
        raise UserError(
            "--instruction is empty", "give the task to perform, e.g. --instruction 'Name three colours.'"
        )
    fmt = _format_from_args(args) or saved_format_of(args.model)
    # Only the chat format, or a model with no saved format, needs the model's tokenizer.
    tokenizer = load_tokenizer(args.model) if fmt is None or fmt.name == "chat" else None
    fmt = _with_system(fmt or default_format_for(tokenizer), args.system)
    text = fmt.prompt(args.instruction, args.input, tokenizer)
    sys.stdout.buffer.write(text.encode("utf-8"))
    if sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    from .chat import run_chat

    settings = _settings_from_args(args)
    run_chat(_load(args), settings, show_stats=not args.no_stats)
    return 0


def _run_infer(args: argparse.Namespace) -> int:
    from .infer import run_infer
    from .records import read_records

    settings = _settings_from_args(args)
    records = read_records(args.input, require_output=False)  # bad input fails before the model loads
    lm = _load(args)
    s = run_infer(
        lm,
        records,
        args.output,
        settings,
        batch_size=args.batch_size,
        limit=args.limit,
        overwrite=args.overwrite,
        echo=args.echo,
        progress=not args.quiet,
    )
    logging.getLogger("alpaca_forge").info(
        "%d answers written to %s (%d were already there); %d tokens in %.1f s (%.1f tok/s)",
        s.written,
        args.output,
        s.already_done,
        s.tokens,
        s.elapsed_s,
        s.tokens_per_s,
    )
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from .generate import FilterConfig, GenerateConfig, Generator
    from .records import read_records
    from .teachers import HttpTeacher, LocalTeacher, RetryPolicy, SamplingParams

    seeds = read_records(args.seeds)  # bad seed files fail here, before any request
    filters = FilterConfig(
        min_words=args.min_words,
        max_words=args.max_words,
        rouge_threshold=args.rouge_threshold,
        **(
            {"blacklist": tuple(w.strip() for w in args.blacklist.split(",") if w.strip())}
            if args.blacklist is not None
            else {}
        ),
        **({"banned_prefixes": tuple(args.banned_prefix)} if args.banned_prefix is not None else {}),
    )
    config = GenerateConfig(
        num_instructions=args.num_instructions,
        seed=args.seed,
        concurrency=args.concurrency,
        filters=filters,
        sampling=SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p),
        price_prompt_usd_per_1m=args.price_prompt_per_1m,
        price_completion_usd_per_1m=args.price_completion_per_1m,
        max_cost_usd=args.max_cost_usd,
        max_requests=args.max_requests,
    )
    if args.teacher_url:
        if not args.teacher_model:
            raise UserError(
                "--teacher-url needs --teacher-model (the model name the server knows)",
                "e.g. --teacher-model gpt-4o-mini",
            )
        retry = RetryPolicy(max_retries=args.max_retries, timeout_s=args.timeout_s)
        teacher = HttpTeacher(
            args.teacher_url,
            args.teacher_model,
            api=args.teacher_api or "chat",
            api_key=os.environ.get(args.teacher_key_env),
            retry=retry,
            seed=args.seed,
        )
    else:
        from .models import DEFAULT_MODEL, load_model

        lm = load_model(args.teacher_model or DEFAULT_MODEL)
        _say("teacher: %s in this process (%.1f s to load)", lm.name, lm.load_s)
        teacher = LocalTeacher(lm, api=args.teacher_api or "completions")
    generator = Generator(teacher, seeds, args.output, config)
    if generator.resumed_with:
        _say(
            "resuming: %d records already in %s, %d requests done",
            generator.resumed_with,
            args.output,
            generator.tally.requests,
        )
    summary = generator.run(progress=not args.quiet)
    drops = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "none"
    _say(
        "%s: %d of %d accepted (%d this run) from %d requests (%.2f per request, %d retries) in %.1f s",
        summary["stop_reason"],
        summary["accepted"],
        summary["target"],
        summary["accepted_this_run"],
        summary["requests"],
        summary["accepted_per_request"],
        summary["retries"],
        summary["wall_time_s_this_run"],
    )
    _say("dropped: %s", drops)
    _say(
        "tokens: %d prompt + %d completion = $%.4f; summary: %s",
        summary["prompt_tokens"],
        summary["completion_tokens"],
        summary["cost_usd"],
        generator.summary_path,
    )
    return (
        0
        if summary["stop_reason"] in ("done",)
        or summary["stop_reason"].startswith(("cost limit", "request limit"))
        else 1
    )


def _say(message: str, *args: object) -> None:
    logging.getLogger("alpaca_forge").info(message, *args)


def _run_data_validate(args: argparse.Namespace) -> int:
    from .data import validate

    for path in args.files:
        print(f"{path}: {len(validate(path))} records, all valid")
    return 0


def _run_data_dedupe(args: argparse.Namespace) -> int:
    import time

    from .data import dedupe, dropped_path_for
    from .records import read_records, write_records

    records = read_records(args.file, require_output=False)
    start = time.perf_counter()
    result = dedupe(records, args.threshold, args.key, progress=not args.quiet)
    elapsed = time.perf_counter() - start
    kept_path = write_records(args.output, result.kept)
    dropped_path = write_records(args.dropped or dropped_path_for(args.output), result.dropped)
    _say(
        "kept %d of %d records (%d dropped, ROUGE-L F1 > %s on %s) in %.1f s",
        len(result.kept),
        len(records),
        len(result.dropped),
        args.threshold,
        args.key,
        elapsed,
    )
    _say("kept: %s; dropped, each with its duplicate: %s", kept_path, dropped_path)
    return 0


def _run_data_stats(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .data import plot_lengths, stats
    from .records import read_records

    records = read_records(args.file, require_output=False)
    numbers = stats(records)
    w = numbers["words"]
    print(
        f"{numbers['records']} records; {numbers['with_input']} with input ({numbers['with_input_share']:.1%}); {numbers['empty_output']} empty outputs"
    )
    for field in ("instruction", "input", "output"):
        s = w[field]
        print(
            f"  {field:<12} words: mean {s['mean']}, median {s['median']:g}, p90 {s['p90']:g}, max {s['max']}"
        )
    print(
        "  most common first words: " + ", ".join(f"{k} {v}" for k, v in numbers["top_first_words"].items())
    )
    name = Path(args.file).name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
    plot = plot_lengths(
        records, args.plot or f"{name}.lengths.png", f"{Path(args.file).name}: lengths in words"
    )
    _say("histograms: %s", plot)
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")
        _say("numbers: %s", args.json)
    return 0


def _run_data_quality(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .data import quality
    from .records import read_records

    records = read_records(args.file, require_output=False)
    report = quality(records, args.threshold, progress=not args.quiet).to_dict(records, args.examples)
    print(f"{report['records']} records checked")
    for name, found in report["checks"].items():
        print(f"  {name:<20} {found['count']:>7}")
        for ex in found["examples"]:
            snippet = (ex["instruction"] + " -> " + ex["output"]).replace("\n", " ")[:110]
            print(f"      [{ex['index']}] {snippet}")
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        _say("report: %s", args.report)
    return 0


def _run_data_clean(args: argparse.Namespace) -> int:
    from .data import dropped_path_for, parse_checks, quality
    from .records import read_records, write_records

    checks = parse_checks(args.checks)  # a typo fails before any work
    records = read_records(args.file, require_output=False)
    flagged = quality(records, args.threshold, progress=not args.quiet).flagged_positions(checks)
    kept = [r for i, r in enumerate(records) if i not in flagged]
    removed = [
        {"index": i, "checks": found, "record": records[i].to_dict()} for i, found in sorted(flagged.items())
    ]
    write_records(args.output, kept)
    removed_path = write_records(dropped_path_for(args.output), removed)
    _say(
        "kept %d of %d records -> %s; %d removed -> %s",
        len(kept),
        len(records),
        args.output,
        len(removed),
        removed_path,
    )
    return 0


def _run_data_split(args: argparse.Namespace) -> int:
    from .data import split, write_split
    from .records import read_records

    train, val = split(read_records(args.file, require_output=False), args.val_size, args.seed)
    train_path, val_path = write_split(train, val, args.output_dir)
    _say("%d training records -> %s; %d validation records -> %s", len(train), train_path, len(val), val_path)
    return 0


def _run_data_convert(args: argparse.Namespace) -> int:
    from .data import convert
    from .records import read_records, write_records

    rows = convert(read_records(args.file, require_output=False), args.to)
    _say("%d records -> %s (%s format)", len(rows), write_records(args.output, rows), args.to)
    return 0


# ---------------------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _log_to_stderr(*, quiet: bool) -> None:
    """Our own messages (loading, summaries) go to stderr; other libraries' logs stay off."""
    log = logging.getLogger("alpaca_forge")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    # Offline-first: nothing is downloaded unless the user explicitly sets HF_HUB_OFFLINE=0.
    # Set before transformers / huggingface_hub are imported, which read it once.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USER_ERROR
    _log_to_stderr(quiet=args.quiet)
    try:
        return args.run(args)
    except UserError as e:
        command = " ".join(filter(None, [args.command, getattr(args, "tool", None)]))
        print(f"alpaca-forge {command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `alpaca-forge infer ... --print | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
