"""One way to register: every kind has a Registry, `diffalign list` prints it, the CLI takes its choices from it,
and the README's table of it lists the same names, descriptions and sources."""

import itertools

import pytest
from conftest import ROOT

from diffalign.cli import build_parser, main
from diffalign.cli.listing import KINDS
from diffalign.data import FORMATS
from diffalign.evaluation.prompts import PROMPT_SETS
from diffalign.families import FAMILIES
from diffalign.guidance import SAMPLERS
from diffalign.objectives import OBJECTIVES
from diffalign.offline import TINY_MODELS
from diffalign.registry import Registry
from diffalign.rewards import REWARDS
from diffalign.rewards.tiny import TINY_REWARDS

# the first header cell of each registry's README table
README_TABLES = {"objective": OBJECTIVES, "family": FAMILIES, "reward": REWARDS, "format": FORMATS,
                 "prompt set": PROMPT_SETS, "sampler": SAMPLERS}


def readme_table(key: str) -> list[dict[str, str]]:
    """The rows of the README table whose header starts with ``| key |``, as {column: cell without backticks}."""
    lines = (ROOT / "README.md").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"| {key} |")]
    assert len(starts) == 1, f"expected one README table headed '| {key} |', found {len(starts)}"
    table = itertools.takewhile(lambda line: line.startswith("|"), lines[starts[0]:])
    cells = [[cell.strip().replace("`", "") for cell in line.strip().strip("|").split("|")] for line in table]
    header = cells[0]
    return [dict(zip(header, row)) for row in cells[2:]] if len(cells) > 2 else []


def subcommand(parser, *names):
    for name in names:
        parser = next(a for a in parser._actions if a.dest in ("command", "tiny_command")).choices[name]
    return parser


def option(parser, flag):
    return next(action for action in parser._actions if flag in action.option_strings)


def test_every_kind_is_a_registry_with_descriptions():
    assert set(KINDS.values()) == set(README_TABLES.values())
    for registry in README_TABLES.values():
        assert isinstance(registry, Registry) and len(registry) > 0
        for entry in registry.entries():
            assert entry.description and "\n" not in entry.description, (registry.kind, entry.name)


@pytest.mark.parametrize("key", list(README_TABLES))
def test_readme_table_agrees_with_its_registry(key):
    registry = README_TABLES[key]
    rows = readme_table(key)
    names = [row[key] for row in rows]
    assert sorted(names) == sorted(registry.names()), f"README table '{key}': the names differ from the registry's"
    for row in rows:
        entry = registry.entry(row[key])
        assert row["what"] == entry.description, f"README table '{key}', row {entry.name}: 'what' differs"
        if "source" in row:
            assert row["source"] == entry.source, f"README table '{key}', row {entry.name}: 'source' differs"


def test_list_prints_each_kind_with_descriptions_and_sources(capsys):
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    for kind, registry in KINDS.items():
        assert f"{kind} ({len(registry)}; chosen with {registry.option})" in printed
        for entry in registry.entries():
            assert f"  {entry.name} " in printed and entry.description.split()[0] in printed
    assert main(["list", "rewards"]) == 0
    rewards = capsys.readouterr().out
    assert rewards.startswith("rewards (") and "samplers" not in rewards
    flattened = " ".join(rewards.split())
    for entry in REWARDS.entries():
        assert entry.description in flattened and f"source: {entry.source}" in flattened


def test_cli_choices_come_from_the_registries():
    parser = build_parser()
    for command in ("sample", "pairs", "eval"):
        assert option(subcommand(parser, command), "--scheduler").choices == SAMPLERS.names()
    for command in ("score", "pairs", "eval"):
        assert all(name in option(subcommand(parser, command), "--reward").help for name in REWARDS)
    for command in ("sample", "pairs"):
        assert all(name in option(subcommand(parser, command), "--prompt-set").help for name in PROMPT_SETS)
    tiny_model = subcommand(parser, "tiny", "model")
    assert option(tiny_model, "--model").choices == TINY_MODELS.names()
    assert option(tiny_model, "--family") is option(tiny_model, "--model")  # the old name still works
    assert list(option(subcommand(parser, "tiny", "reward"), "--reward").choices) == list(TINY_REWARDS)
    assert set(TINY_REWARDS) <= set(REWARDS)
    assert next(a for a in subcommand(parser, "list")._actions if a.dest == "kind").choices == list(KINDS)


def test_an_unknown_name_is_refused_naming_the_closest(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["sample", "--prompt", "x", "--scheduler", "eulr"])
    assert exited.value.code == 2 and "invalid choice: 'eulr'" in capsys.readouterr().err
    assert main(["score", "--images", str(ROOT), "--reward", "clip,hpsv3"]) == 2
    assert capsys.readouterr().err == ("diffalign score: error: --reward: unknown reward 'hpsv3'. Did you mean "
                                       f"'hpsv2'? Available: {', '.join(REWARDS)}\n")
