"""Choose two Matcher hyper-parameters with scikit-learn's GridSearchCV, splitting the data by image.

    python examples/grid_search.py [--quick]

``ByImage(train)`` is the training set as scikit-learn sees it: one sample per image, so a fold
holds whole images with all their captions (captions of one image never straddle folds).
``Matcher.score`` is rSum, so the search keeps the setting with the best held-out rSum, refits it
on all of ``train`` and the script reports it on the test split. The same object works with
``RandomizedSearchCV`` and ``cross_validate``.
"""

import argparse

from sklearn.model_selection import GridSearchCV, KFold

from imtm import Matcher
from imtm.components import GlobalCosine, GRUTextEncoder, PrecomputedEncoder, TripletLoss
from imtm.data import ByImage, synthetic


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a tiny run for smoke tests")
    args = p.parse_args(argv)
    sizes = (
        {"n_train": 16, "n_dev": 2, "n_test": 8, "region_dim": 16}
        if args.quick
        else {"n_train": 600, "n_test": 100}
    )
    dim = 16 if args.quick else 128
    train, _, test = synthetic.load(view="regions", seed=0, **sizes)
    m = Matcher(
        components=[
            ("image", PrecomputedEncoder(in_dim=train.region_dim, out_dim=dim)),
            ("text", GRUTextEncoder(vocab=train.vocab, out_dim=dim)),
            GlobalCosine(),
            ("loss", TripletLoss(hardest=False)),
        ],
        epochs=1 if args.quick else 3,
        batch_size=32 if args.quick else 128,
        verbose=False,
    )
    grid = {"lr": [1e-3, 3e-3], "loss__margin": [0.1, 0.2]}
    search = GridSearchCV(m, grid, cv=KFold(n_splits=2, shuffle=True, random_state=0))
    search.fit(ByImage(train))
    for params, mean in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"]):
        print(f"{params}: held-out rSum {mean:.1f}")
    print(f"best {search.best_params_}; test rSum {search.score(test):.1f}")
    return search


if __name__ == "__main__":
    main()
