"""Shared CLI options: one definition per flag, the same on every command that has it."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from histolens.cli.commands import main
from histolens.cli.options import (
    MAGNIFICATION_CHOICES,
    MAGNIFICATIONS,
    STAIN_NORM_CHOICES,
    combine,
    magnification_option,
    quiet_option,
    split_options,
)


def _commands(group: click.Group = main, prefix: str = ""):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def _option(command: click.Command, flag: str) -> click.Option | None:
    return next((p for p in command.params if flag in getattr(p, "opts", ())), None)


def test_no_command_defines_a_flag_twice():
    for name, command in _commands():
        flags = [o for p in command.params for o in (*p.opts, *p.secondary_opts)]
        assert len(flags) == len(set(flags)), name


@pytest.mark.parametrize(
    ("flag", "choices"),
    [("--magnification", MAGNIFICATION_CHOICES), ("--stain-norm", STAIN_NORM_CHOICES)],
)
def test_a_shared_flag_has_the_same_choices_everywhere(flag, choices):
    having = {name: _option(command, flag) for name, command in _commands()}
    having = {name: option for name, option in having.items() if option is not None}
    assert len(having) >= 2, having  # really shared
    for name, option in having.items():
        if name == "data synth":  # its own: the magnification the synthetic images pretend
            continue
        # predict is told the magnification of its images: one of them, never "all".
        expected = MAGNIFICATIONS if (name, flag) == ("predict", "--magnification") else choices
        assert tuple(option.type.choices) == expected, name


def test_split_options_with_and_without_defaults():
    @click.command()
    @split_options()
    def with_defaults(**values):
        click.echo(repr(sorted(values.items())))

    @click.command()
    @split_options(defaults=False)
    def overrides_only(**values):
        click.echo(repr(sorted(values.items())))

    shown = CliRunner().invoke(with_defaults, ["-m", "400"]).output
    assert "('magnification', '400')" in shown and "('task', 'binary')" in shown
    assert "('val_fraction', 0.15)" in shown and "('seed', 42)" in shown
    given = CliRunner().invoke(overrides_only, ["--seed", "7"]).output
    assert "('seed', 7)" in given and "('task', None)" in given
    assert "('group_by', None)" in given and "('magnification', None)" in given


def test_combined_options_keep_their_order_and_reject_bad_values():
    @click.command()
    @combine(quiet_option(), magnification_option("all"))
    def command(quiet, magnification):
        click.echo(f"{quiet} {magnification}")

    assert [p.name for p in command.params] == ["quiet", "magnification"]
    assert CliRunner().invoke(command, ["-m", "ALL", "--quiet"]).output == "True all\n"
    bad = CliRunner().invoke(command, ["-m", "50"])
    assert bad.exit_code == 2 and "'40', '100', '200', '400', 'all'" in bad.output


def test_help_loads_no_heavy_library(modules_after_help):
    """`histolens --help` and `histolens explain --help` stay instant: no torch, no CAM library."""
    loaded, _ = modules_after_help(["explain", "--help"], ["torch", "pytorch_grad_cam", "captum"])
    assert loaded == []
