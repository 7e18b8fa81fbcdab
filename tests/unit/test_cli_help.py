"""`jetserve COMMAND --help` prints every command's flags and exits 0 (argparse %-formats help strings, so a bare
"%" in a Settings description once made `jetserve serve --help` raise)."""

from __future__ import annotations

import pytest

from server.cli import COMMANDS, main
from server.config import Settings


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_exits_cleanly(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: jetserve " + command)
    if command == "serve":  # one flag per Settings field (api_keys is --api-key), descriptions with "%" intact
        text = " ".join(out.split())
        for name, field in Settings.model_fields.items():
            assert ("--api-key" if name == "api_keys" else "--" + name.replace("_", "-")) in text, name
            desc = " ".join((field.description or "").split())
            if "%" in desc:
                cut = desc.index("%")
                assert desc[max(0, cut - 20) : cut + 20] in text, name
