"""DIAS on the built-in benchmark, and DIAS's regularisers added to CHAN in one line.

    python examples/dias_synthetic.py [--quick]

``presets.dias`` is the local matching framework (soft assignment coding over CHAN's
encoders) trained with the dimension-alignment loss and the sparse spatial constraints
(Eq. 17); ``presets.dias_losses()`` appends the same losses to any preset.
"""

import argparse

from imtm import Matcher, presets
from imtm.data import synthetic
from imtm.metrics import format_table


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a tiny run for smoke tests")
    args = p.parse_args(argv)
    sizes = (
        {"n_train": 120, "n_dev": 10, "n_test": 40}
        if args.quick
        else {"n_train": 1000, "n_dev": 50, "n_test": 500}
    )
    train, _, test = synthetic.load(view="regions", seed=0, **sizes)
    common = {"embed_dim": 32 if args.quick else 128, "word_dim": 32 if args.quick else 64}
    rows = {
        "DIAS": presets.build("dias", train, **common),
        "CHAN + dimension alignment": presets.build("chan", train, **common)
        + presets.dias_losses(inter=False, intra=False),
    }
    results = {}
    for label, components in rows.items():
        m = Matcher(
            components,
            epochs=1 if args.quick else 4,
            batch_size=64 if args.quick else 128,
            lr=2e-3,
            random_state=0,
            verbose=False,
        ).fit(train)
        results[label] = m.evaluate(test)
        losses = {k: round(v, 3) for k, v in m.history_[-1].items() if k.startswith("loss/")}
        print(f"{label}: rSum {results[label]['rsum']:.1f}, last-epoch losses {losses}", flush=True)
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
