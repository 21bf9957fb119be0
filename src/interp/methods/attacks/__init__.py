"""Attacks beyond FGSM and PGD: CW-L2, DeepFool, APGD (CE, DLR, targeted), Square, FAB (and FAB-T), an
AutoAttack-style ensemble. Each returns an ``interp.methods.adversarial.Attack``; all are also
importable from ``interp.methods.adversarial``."""

from interp.methods.attacks.apgd import apgd, apgd_t, dlr_loss, dlr_loss_targeted
from interp.methods.attacks.ensemble import autoattack
from interp.methods.attacks.fab import fab, fab_t
from interp.methods.attacks.minimal import cw, deepfool, min_norm_accuracy
from interp.methods.attacks.square import square

__all__ = ["apgd", "apgd_t", "autoattack", "cw", "deepfool", "dlr_loss", "dlr_loss_targeted",
           "min_norm_accuracy", "square", "fab", "fab_t"]  # fmt: skip
