from imtm.components.encoders import GRUTextEncoder, PrecomputedEncoder
from imtm.components.losses import InfoNCELoss, TripletLoss
from imtm.components.scorers import GlobalCosine
