"""From image files to a trained model on a frozen backbone: write, load, extract once, train.

    python examples/raw_images_extract.py [--quick]

1. Writes the synthetic benchmark's pixel view as PNG files plus a Karpathy split
   JSON, the way Flickr30K arrives (``dataset_flickr30k.json`` + an image folder).
2. Reads it with ``KarpathyDataset`` and the backbone's own transform.
3. Runs a frozen ViT once over every image with ``extract_features`` (what
   ``imtm extract`` does): tokens go to resumable shards, then to the precomputed layout.
4. Trains VSE++ on the extracted tokens (``PrecompDataset``) and prints R@K.

The ViT here is a small random-init one, so the features are weak: the point is the
path, not the score. With real weights pass ``checkpoint_path=`` to the encoder.
"""

import argparse
import json
import tempfile
from pathlib import Path

from torchvision.transforms.functional import to_pil_image

from imtm import Matcher
from imtm.components import TimmVisionEncoder
from imtm.data import KarpathyDataset, PrecompDataset, extract_features, synthetic
from imtm.data.transforms import image_transform
from imtm.metrics import format_table
from imtm.presets import vsepp


def write_karpathy_folder(root: Path, splits: dict) -> Path:
    """Save each split's images as PNG and describe them in a Karpathy split JSON."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for split, data in splits.items():
        for i in range(data.n_images):
            name = f"{split}_{i:05d}.png"
            to_pil_image(data.images[i]).save(root / "images" / name)
            caps = [
                data.captions[c] for c in (data.caption_to_image == i).nonzero().flatten().tolist()
            ]
            entries.append(
                {
                    "filename": name,
                    "split": split,
                    "imgid": len(entries),
                    "sentences": [{"raw": c} for c in caps],
                }
            )
    path = root / "dataset_synthetic.json"
    path.write_text(json.dumps({"images": entries, "dataset": "synthetic"}))
    return path


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a tiny run for smoke tests")
    args = p.parse_args(argv)
    sizes = (
        {"n_train": 60, "n_dev": 5, "n_test": 20}
        if args.quick
        else {"n_train": 1000, "n_dev": 5, "n_test": 200}
    )
    train_px, _, test_px = synthetic.load(view="pixels", seed=0, **sizes)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ann = write_karpathy_folder(root, {"train": train_px, "test": test_px})

        encoder = TimmVisionEncoder(
            "vit_small_patch16_224", img_size=64, freeze=True, model_kwargs={"depth": 2}
        )
        transform = image_transform(encoder)  # the backbone's resize, crop and normalisation
        out = root / "features"
        for split in ("train", "test"):
            data = KarpathyDataset(ann, root / "images", split, transform)
            extract_features(
                encoder, data, out, split, batch_size=32, shard_size=256, progress=not args.quick
            )

        train = PrecompDataset(out, "train", build_vocab=True)
        test = PrecompDataset(out, "test", vocab=train.vocab)
        m = Matcher(
            vsepp(vocab=train.vocab, region_dim=train.images.shape[2], embed_dim=128, word_dim=64),
            epochs=1 if args.quick else 6,
            batch_size=128,
            lr=2e-3,
            random_state=0,
            verbose=False,
        )
        m.fit(train)
        results = m.evaluate(test)
    print(
        f"{train.n_images} training images, tokens {train.images.shape[1:]} per image from a frozen ViT"
    )
    print(format_table({"vsepp on extracted ViT tokens": results}))
    return results


if __name__ == "__main__":
    main()
