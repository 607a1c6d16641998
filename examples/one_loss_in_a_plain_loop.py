"""Use one imtm loss in your own training loop: no Matcher, plain tensors.

python examples/one_loss_in_a_plain_loop.py
"""

import torch

from imtm.functional import triplet_loss


def main(steps: int = 50):
    torch.manual_seed(0)
    images, texts = torch.randn(64, 32), torch.randn(64, 32)  # your own features
    image_ids = torch.arange(64) // 2  # two captions per image
    img_proj, txt_proj = torch.nn.Linear(32, 16), torch.nn.Linear(32, 16)
    opt = torch.optim.Adam([*img_proj.parameters(), *txt_proj.parameters()], lr=1e-2)
    for _ in range(steps):
        v = torch.nn.functional.normalize(img_proj(images), dim=-1)
        t = torch.nn.functional.normalize(txt_proj(texts), dim=-1)
        scores = v @ t.T  # scores[i, t]: images are rows
        positives = image_ids[:, None] == image_ids[None, :]
        loss = triplet_loss(scores, positives, margin=0.2, hardest=False, reduction="mean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = float(loss.detach())
    print(f"final loss {final:.4f}")
    return final


if __name__ == "__main__":
    main()
