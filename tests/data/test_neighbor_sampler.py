from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from toy import toy_components, toy_data

from imtm import Matcher
from imtm.components import MeanEmbedding
from imtm.data import ImageCaptionDataset, KMeansNeighborSampler, collate
from imtm.engine.graph import PipelineError
from imtm.engine.sampling import image_embeddings


def dataset(n_images=40, captions=(1, 2, 3), seed=0):
    """Images with 1-3 captions each (caption k of the list belongs to image c2i[k]), shuffled order."""
    g = np.random.default_rng(seed)
    c2i = np.concatenate([[i] * captions[i % len(captions)] for i in range(n_images)])
    c2i = c2i[g.permutation(c2i.size)]
    return ImageCaptionDataset(
        torch.zeros(n_images, 2), [f"caption {k}" for k in range(c2i.size)], c2i.tolist()
    )


def blobs(n_images=40, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, 8, generator=g) * 10
    return centres[torch.arange(n_images) % k] + 0.1 * torch.randn(n_images, 8, generator=g)


@pytest.mark.parametrize("captions", ["one", "all"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_image_once_per_epoch_and_batches_of_the_promised_shape(captions, drop_last):
    ds = dataset()
    m, p = 3, 4
    sampler = KMeansNeighborSampler(
        ds,
        clusters_per_batch=m,
        images_per_cluster=p,
        n_clusters=5,
        captions=captions,
        drop_last=drop_last,
    )
    sampler.update_embeddings(blobs())
    c2i = ds.caption_to_image
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        images = [c2i[torch.tensor(b)].tolist() for b in batches]
        per_batch = [len(set(x)) for x in images]
        # Every batch holds M * P distinct images; only the last may be smaller (and is dropped with drop_last).
        assert all(n == m * p for n in per_batch[:-1])
        assert per_batch[-1] == m * p if drop_last else 1 <= per_batch[-1] <= m * p
        seen = Counter(i for x in images for i in set(x))
        assert max(seen.values()) == 1
        if not drop_last:
            assert sorted(seen) == list(range(40))
        if captions == "one":
            assert all(len(x) == len(set(x)) for x in images)
        else:
            counts = Counter(c2i.tolist())
            assert all(len(b) == sum(counts[i] for i in set(x)) for b, x in zip(batches, images))
            if not drop_last:
                assert sorted(k for b in batches for k in b) == list(range(len(ds)))


def test_full_batches_take_p_images_from_each_of_m_clusters():
    ds = dataset(n_images=60, captions=(1,))
    sampler = KMeansNeighborSampler(ds, clusters_per_batch=2, images_per_cluster=3, n_clusters=5)
    labels = sampler.update_embeddings(blobs(60))
    # K-means finds the five blobs.
    assert len({tuple(np.flatnonzero(labels == c)) for c in range(5)}) == 5
    assert all(len(set(labels[np.arange(60) % 5 == r])) == 1 for r in range(5))
    groups = sampler.image_batches()
    from_clusters = [g for g in groups[:-1] if sorted(Counter(labels[g]).values()) == [3, 3]]
    assert (
        len(from_clusters) >= 8
    )  # the 12 groups of 3 per blob give >= 8 two-cluster batches before leftovers
    for g in from_clusters:
        assert len(g) == 6


def test_same_epoch_same_batches_new_epoch_new_order():
    ds = dataset()
    sampler = KMeansNeighborSampler(
        ds, clusters_per_batch=2, images_per_cluster=4, n_clusters=4, random_state=1
    )
    sampler.update_embeddings(blobs())
    first, again = list(sampler), list(sampler)
    assert first == again
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_random_clusters_before_any_embedding():
    sampler = KMeansNeighborSampler(
        dataset(), clusters_per_batch=2, images_per_cluster=4, n_clusters=4
    )
    assert sampler.labels_ is None
    assert sorted(i for b in sampler.image_batches() for i in b.tolist()) == list(range(40))


def test_images_without_captions_are_never_yielded():
    ds = ImageCaptionDataset(torch.zeros(6, 2), ["a", "b", "c", "d"], [0, 2, 2, 5])
    sampler = KMeansNeighborSampler(ds, clusters_per_batch=1, images_per_cluster=2, n_clusters=2)
    labels = sampler.update_embeddings(torch.randn(6, 3))
    assert labels[1] == labels[3] == labels[4] == -1
    assert sorted(i for b in sampler.image_batches() for i in b.tolist()) == [0, 2, 5]


def test_matcher_reclusters_from_the_current_model_before_every_epoch(monkeypatch):
    data = toy_data(n_images=24, cpi=2)
    sampler = KMeansNeighborSampler(data, clusters_per_batch=2, images_per_cluster=3, n_clusters=4)
    calls = []
    original = sampler.update_embeddings

    def spy(embeddings):
        calls.append((sampler.epoch, embeddings.clone()))
        return original(embeddings)

    monkeypatch.setattr(sampler, "update_embeddings", spy)
    m = Matcher(
        toy_components(data.vocab), epochs=2, batch_size=6, lr=1e-2, verbose=False, device="cpu"
    )
    m.fit(DataLoader(data, batch_sampler=sampler, collate_fn=collate))
    assert [c[0] for c in calls] == [0, 1]
    assert calls[0][1].shape == (24, 8)
    assert not torch.allclose(calls[0][1], calls[1][1])  # the model moved between epochs
    # What the hook computed is the trained model's mean image tokens, in eval mode.
    torch.testing.assert_close(
        image_embeddings(m, data.images), m.encode_images(data.images)["image_tokens"].masked_mean()
    )
    # A pipeline with a pooled image embedding hands that value instead.
    m2 = Matcher(
        toy_components(data.vocab)[:1] + [MeanEmbedding()] + toy_components(data.vocab)[1:],
        epochs=1,
        batch_size=6,
        verbose=False,
        device="cpu",
    )
    m2.fit(DataLoader(data, batch_sampler=sampler, collate_fn=collate))
    assert m2.plan_.sides["image_embedding"] == frozenset({"image"})
    assert image_embeddings(m2, data.images).shape == (24, 8)


def test_image_embeddings_need_an_image_side_value():
    data = toy_data(n_images=6)
    m = Matcher(
        toy_components(data.vocab), epochs=1, batch_size=6, verbose=False, device="cpu"
    ).fit(data)
    m.plan_.sides.pop("image_tokens")
    with pytest.raises(PipelineError, match="no image-side block provides"):
        image_embeddings(m, data.images)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"clusters_per_batch": 0}, ValueError, "clusters_per_batch must be a positive integer"),
        ({"images_per_cluster": 2.5}, ValueError, "images_per_cluster must be a positive integer"),
        ({"captions": "some"}, ValueError, "captions must be one of"),
        ({"drop_last": 1}, TypeError, "drop_last must be True or False"),
        ({"random_state": -1}, ValueError, "random_state must be an integer >= 0"),
        (
            {"n_clusters": 2, "clusters_per_batch": 3},
            ValueError,
            r"n_clusters \(2\) must be at least clusters_per_batch",
        ),
        ({"n_clusters": 41}, ValueError, "exceeds the 40 images with captions"),
        ({"kmeans_batch_size": 0}, ValueError, "kmeans_batch_size must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        KMeansNeighborSampler(dataset(), **kwargs)


def test_bad_datasets_and_embeddings():
    with pytest.raises(TypeError, match="has no 'images'"):
        KMeansNeighborSampler([1, 2, 3])
    sampler = KMeansNeighborSampler(
        dataset(), clusters_per_batch=2, images_per_cluster=2, n_clusters=4
    )
    with pytest.raises(ValueError, match=r"expected embeddings of shape \(40, D\)"):
        sampler.update_embeddings(torch.randn(39, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        sampler.update_embeddings(torch.full((40, 4), float("nan")))
