"""The Hugging Face ``datasets`` adapter: map-style datasets, streams, PIL images, bad columns."""

import pytest
import torch
from dist_workers import components
from toy import toy_data

from imtm import Matcher
from imtm.data import from_hf_dataset
from imtm.data.hf import HFStream, InMemory, to_tensor


@pytest.fixture(scope="module")
def toy():
    return toy_data(n_images=6, cpi=2)


def columns(toy):
    """One row per caption, the image repeated, with an image id column (COCO's layout on the hub)."""
    ids = toy.caption_to_image.tolist()
    return {
        "image": [toy.images[i] for i in ids],
        "caption": list(toy.captions),
        "image_id": [10 + i for i in ids],
    }


def test_a_map_style_dataset_becomes_an_imtm_dataset(toy):
    ds = from_hf_dataset(InMemory(columns(toy)), image_id_column="image_id", vocab=toy.vocab)
    assert ds.n_images == toy.n_images and ds.captions == toy.captions
    assert ds.caption_to_image.tolist() == toy.caption_to_image.tolist()
    for i in range(toy.n_images):
        torch.testing.assert_close(ds.images[i], toy.images[i])
    # without ids: one image per row
    flat = from_hf_dataset(InMemory(columns(toy)))
    assert flat.n_images == len(toy.captions) and flat.caption_to_image.tolist() == list(
        range(len(toy.captions))
    )
    m = Matcher(components(toy.vocab), epochs=1, batch_size=4, device="cpu", verbose=False).fit(ds)
    assert m.evaluate(ds)["rsum"] >= 0


def test_a_stream_trains_with_steps_per_epoch_and_passes_set_epoch_on(toy):
    class HubStream:  # what load_dataset(..., streaming=True) gives: rows, set_epoch, no len
        def __init__(self, rows):
            self.rows, self.epochs = rows, []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __iter__(self):
            return iter(self.rows)

    cols = columns(toy)
    rows = [dict(zip(cols, values)) for values in zip(*cols.values())]
    hub = HubStream(rows)
    stream = from_hf_dataset(hub, image_id_column="image_id")
    assert isinstance(stream, HFStream)
    items = list(stream)
    assert [x["texts"] for x in items] == toy.captions
    assert [x["image_ids"] for x in items] == toy.caption_to_image.tolist()
    m = Matcher(
        components(toy.vocab),
        epochs=2,
        batch_size=4,
        steps_per_epoch=2,
        device="cpu",
        verbose=False,
    ).fit(stream)
    assert [h["step"] for h in m.history_] == [2, 4] and len(hub.epochs) == 2


def test_pil_images_become_uint8_tensors():
    pil = pytest.importorskip("PIL.Image")
    img = pil.new("RGB", (5, 3), (10, 20, 30))
    t = to_tensor(img)
    assert t.shape == (3, 3, 5) and t.dtype == torch.uint8 and t[:, 0, 0].tolist() == [10, 20, 30]


def test_bad_columns_and_cells_are_refused(toy):
    with pytest.raises(ValueError, match="no column 'text'"):
        from_hf_dataset(InMemory(columns(toy)), caption_column="text")
    with pytest.raises(TypeError, match="row 1"):
        from_hf_dataset(InMemory({"image": [0, 1], "caption": ["a", 3]}))


def test_a_real_datasets_dataset(toy):
    datasets = pytest.importorskip("datasets")
    hub = datasets.Dataset.from_dict(
        {
            "image": [t.tolist() for t in toy.images],
            "caption": [
                [c for c, i in zip(toy.captions, toy.caption_to_image.tolist()) if i == k]
                for k in range(toy.n_images)
            ],
        }
    )
    ds = from_hf_dataset(hub, transform=torch.tensor)
    assert ds.captions == toy.captions and ds.n_images == toy.n_images
    torch.testing.assert_close(ds.images[2], toy.images[2])
