"""Every `vlmtune` command's --help renders: argparse %-formats help text, so one stray '%' in a config field's
help (as "4% less memory" once did) crashes `--help` with a TypeError instead of printing it."""
import pytest

from pipelines.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_renders(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
