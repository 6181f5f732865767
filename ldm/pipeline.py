"""The Pipeline: the five modules of a latent diffusion model and the family facts no weight file records.

A Pipeline holds a tokenizer, a text encoder, a VAE, a UNet and a DDIM scheduler, plus the latent scale factor,
the prediction type and the image frame of its family (channels, size, range). It is the model a student reads
(ARCHITECTURE.md "Public interface"); how one is read from a converted folder, saved, or converted from a source
checkpoint is plumbing in ldm/weights/folder.py (`from ldm import load_pipeline` re-exports it).
"""
from dataclasses import dataclass, field

from ldm.schedulers import DDIMScheduler
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.tokenizer import CLIPTokenizer
from ldm.unet import UNet2DConditionModel, UNetConfig
from ldm.vae import AutoencoderKL, VAEConfig

FAMILIES = ("sd1", "sd2", "monai_cxr", "phantom")
# component name -> (config class, module class); also the weight file names
COMPONENTS = {"text_encoder": (TextEncoderConfig, TextEncoder), "vae": (VAEConfig, AutoencoderKL),
              "unet": (UNetConfig, UNet2DConditionModel)}
# family facts that no weight file records (docs/formats.md): pad id, latent scale, image channels and range
# SD1 pads with <|endoftext|> (id 49407 in the real vocabulary); SD2 and the MONAI CXR LDM with "!" (id 0)
PAD_TOKENS = {"sd1": "<|endoftext|>", "sd2": "!", "monai_cxr": "!"}
SCALE_FACTORS = {"sd1": 0.18215, "sd2": 0.18215, "monai_cxr": 0.3}
IMAGE_RANGES = {"sd1": [-1.0, 1.0], "sd2": [-1.0, 1.0], "monai_cxr": [0.0, 1.0], "phantom": [0.0, 1.0]}


@dataclass
class Pipeline:
    tokenizer: CLIPTokenizer
    text_encoder: TextEncoder
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    scale_factor: float
    prediction_type: str                          # "epsilon" | "v_prediction"
    family: str                                   # one of FAMILIES
    image: dict = field(default_factory=dict)     # {"channels": 3, "size": 512, "range": [-1.0, 1.0]}
    config: dict = field(default_factory=dict)    # the model.yaml it was loaded from (informational, for users)

    def model_config(self):
        """The model.yaml contents for this pipeline's current modules."""
        return {"family": self.family, "scale_factor": float(self.scale_factor),
                "prediction_type": self.prediction_type, "image": dict(self.image),
                "tokenizer": {"pad_id": self.tokenizer.pad_id, "max_length": self.tokenizer.max_length},
                **{name: getattr(self, name).config.to_dict() for name in COMPONENTS},
                "scheduler": self.scheduler.config.to_dict()}
