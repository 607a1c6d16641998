"""Train the VSE++ global baseline on the built-in synthetic benchmark and print R@K.

python examples/vsepp_synthetic.py [--quick]
"""

import argparse

from imtm import Matcher
from imtm.components import GlobalCosine, GRUTextEncoder, PrecomputedEncoder, TripletLoss
from imtm.data import synthetic
from imtm.metrics import format_table


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a tiny run for smoke tests")
    args = p.parse_args(argv)
    sizes = dict(n_train=200, n_dev=20, n_test=50) if args.quick else dict(n_train=2000, n_dev=100)
    train, dev, test = synthetic.load(view="regions", seed=0, **sizes)
    m = Matcher(
        components=[
            PrecomputedEncoder(in_dim=train.region_dim, out_dim=128),
            GRUTextEncoder(vocab=train.vocab, out_dim=128, word_dim=64),
            GlobalCosine(),
            TripletLoss(margin=0.2, warmup_epochs=1),
        ],
        epochs=1 if args.quick else 4,
        batch_size=128,
        lr=2e-3,
    )
    m.fit(train, eval_set=dev)
    print(format_table({"vsepp": m.evaluate(test)}))
    return m


if __name__ == "__main__":
    main()
