"""The docs name only flags that exist: a command of train.py, pack_shards.py, viz.py or throughput.py in the docs
passes only flags that script's parser takes, and every --flag the docs name anywhere is some entry point's (or one
of the few other tools' they quote); the README's map of the files names those there are; its list of the default
recipe is train.py's."""

import argparse
import importlib
import re

import pytest

from conftest import ROOT

DOCS = ["README.md", "BENCHMARKS.md", "benchmarks/README.md", "docs/demo_results.md"]
SCRIPTS = {"train.py": "train", "pack_shards.py": "pack_shards", "viz.py": "viz",
           "throughput.py": "benchmarks.throughput", "vitdeit.demo": "vitdeit.demo",
           "gpu_check.sh": "benchmarks.throughput", "gpu_train.sh": "train"}  # the .sh pass their flags on
OTHER_TOOLS = {"--dry-run",  # gpu_check.sh's own
               "--no-deps", "--index-url", "--durations", "--dist",  # pip's, pytest's, pytest-xdist's
               "--nnodes", "--nproc_per_node", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--node-rank",
               "--master-addr", "--master-port", "--max-restarts",  # torchrun's
               "--requeue",  # Slurm's sbatch's
               "--cooldown-epochs"}  # the DeiT reference's, quoted
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")  # (_: torchrun's --nproc_per_node is one flag)


class Parsed(Exception):
    pass


def parser_flags(module: str, monkeypatch) -> set[str]:
    """The --flags the entry point's own argparse parser takes (not words of its help text): its main() is stopped
    where it parses its arguments."""
    def record(parser, *args, **kwargs):
        raise Parsed({o for a in parser._actions for o in a.option_strings if o.startswith("--")})

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", record)
        with pytest.raises(Parsed) as parsed:
            importlib.import_module(module).main([])
    return parsed.value.args[0]


def commands(text: str) -> list[str]:
    """Every command the docs show: fenced blocks' lines (a trailing backslash joins the next) and `code` spans."""
    blocks = re.findall(r"^```\w*\n(.*?)^```", text, re.S | re.M)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```\w*\n.*?^```", "", text, flags=re.S | re.M))
    return [c.split(" # ")[0] for c in lines + spans]


def test_each_documented_command_passes_only_its_scripts_flags(monkeypatch):
    known = {script: parser_flags(module, monkeypatch) for script, module in SCRIPTS.items()}
    known["gpu_check.sh"] |= {"--dry-run"}
    checked = 0
    for doc in DOCS:
        for command in commands((ROOT / doc).read_text()):
            # the flags after each script's name, up to the next script's (a command may chain a few with &&)
            for script, args in re.findall(r"(\S+?\.py|vitdeit\.demo|\S+?\.sh)\b(.*?)(?=\S+\.py\b|&&|;|\||$)",
                                           command):
                name = script.rsplit("/", 1)[-1]
                if name not in known:
                    continue
                for flag in FLAG.findall(args):
                    checked += 1
                    assert flag in known[name], f"{doc}: `{command.strip()}`: {name} has no {flag}"
    assert checked > 60  # the docs' commands were found and read, not skipped


def test_every_flag_the_docs_name_is_an_entry_points(monkeypatch):
    known = set().union(*(parser_flags(module, monkeypatch) for module in set(SCRIPTS.values()))) | OTHER_TOOLS
    for doc in DOCS:
        named = set(FLAG.findall((ROOT / doc).read_text()))
        assert named - known == set(), f"{doc} names flags no entry point has"
    assert "--teacher-ckpt" in known and "--resize-short" in known and "--e2e-unit" in known


def test_the_readmes_map_names_every_module_and_script_and_only_those():
    text = (ROOT / "README.md").read_text().split("## What the pieces do", 1)[1].split("```")[1]
    named = set(re.findall(r"[\w.]+\.(?:py|sh|md)\b", text))
    files = {p.name for d in ("vitdeit", "vitdeit/data", "benchmarks") for p in (ROOT / d).iterdir()
             if p.suffix in (".py", ".sh") and p.name != "__init__.py"}
    files |= {p.name for p in ROOT.glob("*.py")} | {"README.md", "demo_results.md"}
    assert named == files


def test_the_readmes_list_of_the_default_recipe_is_train_pys_defaults():
    import torch

    from vitdeit.config import Config
    from vitdeit.trainer import make_optimizer

    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())  # (its lines joined)
    said = re.search(r"\(the defaults: (AdamW, wd [^)]*)\)", text)[1]
    d, num = Config(), lambda x: f"{x:g}".replace("e-0", "e-")  # (1e-6, as the README writes it)
    assert said == (f"AdamW, wd {num(d.weight_decay)}, label smoothing {num(d.label_smoothing)}, drop path "
                    f"{num(d.drop_path)}, gradient clipping at norm {num(d.clip_grad)}, {num(d.warmup_epochs)} warm-up "
                    f"epoch, then a cosine to {num(d.min_lr)}, " + ("no Mixup" if d.mixup == d.cutmix == 0 else "Mixup")
                    + ", " + ("an EMA" if d.model_ema else "no EMA"))
    optimizer = make_optimizer(torch.nn.Linear(2, 2), d, 1e-3, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW  # (its decay: the weights' group; norms and biases none)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, d.weight_decay]
