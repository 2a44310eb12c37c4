"""CycleGAN's image history pool, used by ``UnpairedCycleModel`` for its discriminators' fakes."""
import torch


class ImageHistoryPool:
    """CycleGAN's history of generated images, so a discriminator also sees older fakes.

    ``query(images [B, C, H, W]) -> [B, C, H, W]``: until ``size`` images are stored each new image is
    stored and returned; after that each returned image is, with probability 1/2, a stored one (replaced
    by the new image) and otherwise the new one. ``size == 0`` returns the input. Images are detached.
    Uses torch's global RNG, so runs are reproducible under basicsr's ``manual_seed``.
    """

    def __init__(self, size):
        self.size = int(size)
        self.images = []

    def query(self, images):
        images = images.detach()
        if self.size <= 0:
            return images
        if self.images and self.images[0].shape != images.shape[1:]:
            self.images = []  # the patch size changed (e.g. resumed with another gt_size): start afresh
        out = []
        for img in images:
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif torch.rand(()).item() < 0.5:
                k = int(torch.randint(len(self.images), ()).item())
                out.append(self.images[k])
                self.images[k] = img.clone()
            else:
                out.append(img)
        return torch.stack(out)

    def state_dict(self):
        """The stored images as one CPU tensor ``[n, C, H, W]`` (``[0]`` when empty)."""
        return torch.stack(self.images).cpu() if self.images else torch.zeros(0)

    def load_state_dict(self, images, device):
        self.images = [] if images.numel() == 0 else list(images.to(device).unbind(0))[:self.size]
