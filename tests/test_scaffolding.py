"""docs/design.md: the five method scripts share their scaffolding word for word (the argument header, the setup
and the epoch loop), so that `diff vae.py X.py` shows only what method X changes. Each script may depart from
vae.py's scaffolding only in the lines listed here; a change to the scaffolding of one script (or a method line
that grew into the loop) fails until it is made in all of them or listed, on purpose, below."""
import difflib
import re
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPTS = ["svi.py", "savae.py", "lagging.py", "iwae.py"]
# (vae.py's lines the script replaces or drops, how many lines the script adds there)
ALLOWED = {
    "svi.py": ({'encoder, decoder = common.build_model(args, dataset)',
                'modules = {"encoder": encoder, "decoder": decoder}',
                'optimizer = common.make_optimizer([*encoder.parameters(), *decoder.parameters()], args)',
                'encoder.train(), decoder.train()', 'encoder.eval(), decoder.eval()'}, 5),
    "savae.py": (set(), 0),
    "lagging.py": ({'optimizer = common.make_optimizer([*encoder.parameters(), *decoder.parameters()], args)',
                    'optimizers = {"optimizer": optimizer}', 'rec, kl = train_step(x, kl_weight)',
                    'common.end_epoch(args, state, meter, val, dataset=dataset, modules=modules, optimizers=optimizers)'},
                   19),
    "iwae.py": ({'rec, kl = train_step(x, kl_weight)', 'meter.add(kl_weight, neg_elbo=rec + kl, rec=rec, kl=kl)'}, 2),
}


def scaffolding(script):
    """The header (the parser up to add_shared_args), the setup (data to the first function) and the loop
    (common.start to the end), as stripped lines without comments."""
    src = (Path(ROOT) / script).read_text()
    parts = [src[src.index("parser = argparse"):src.index("common.add_shared_args(parser)\n") + 31],
             src[src.index("dataset = data.load(args)"):src.index("\ndef ")],
             src[src.index("state = common.start("):]]
    lines = []
    for part in parts:
        for line in part.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


@pytest.mark.parametrize("script", SCRIPTS)
def test_scaffolding_differs_from_vae_only_in_listed_lines(script):
    vae, other = scaffolding("vae.py"), scaffolding(script)
    removed, added = set(), []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=vae, b=other, autojunk=False).get_opcodes():
        if tag != "equal":
            removed.update(vae[i1:i2])
            added += other[j1:j2]
    allowed_removed, allowed_added = ALLOWED[script]
    assert removed <= allowed_removed, f"{script} changes vae.py's scaffolding lines {removed - allowed_removed}"
    assert len(added) == allowed_added, f"{script} adds {len(added)} scaffolding lines, expected {allowed_added}: {added}"


@pytest.mark.parametrize("script", ["vae.py", *SCRIPTS])
def test_every_script_parses_its_own_name_and_ends_with_the_test(script):
    src = (Path(ROOT) / script).read_text()
    assert f'args = common.parse_args(parser, "{script[:-3]}")' in src
    assert src.rstrip().endswith("common.final_test(args, state, infer, decoder, dataset, modules)")
