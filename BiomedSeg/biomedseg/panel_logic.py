"""Compatibility names for ``biomedseg.panel``, where the panel's logic now lives (one module per job).

Scenes, scripts and notebooks that did ``from biomedseg import panel_logic`` keep working: every
name this module had is the same object here. New code imports from ``biomedseg.panel``.
"""
from .catalog import default_model_id, get_model
from .io.dicom_files import order_dicom_files
from .panel.background_steps import BackgroundSteps
from .panel.controller import PanelController, PollResult
from .panel.guessing import (SITE_SYNONYMS, SITE_WORDS, Guess, guess_modality_site, match_modality, match_site,
                             modalities_for, read_dicom_tags, sites_for, state_for_guess, suggestions)
from .panel.install import (DOWNLOAD_CODE, ENGINE_PACKAGES, WORKER_REQUIREMENTS, InstallPlan, Step,
                            constraints_for_installed, download_plan, env_python, hub_cache_bytes, install_plan,
                            missing_engine_packages, missing_requirements, weights_progress)
from .panel.messages import (PanelMessage, Progress, RunOutcome, button_states, describe_error, describe_progress,
                             device_label, format_seconds)
from .panel.models import ModelChoice, model_choices, model_states
from .panel.request import Request, build_request
from .panel.state import (DEVICES, EXPORT_FORMATS, POSTPROCESS, SLICE_AXES, WRITE_MODES, PanelState, join_prompts,
                          parse_prompts, state_from_parameters)
from .panel.worker_python import isolated_environment


def crop_box(volume, slice_axis="axial", slice_range=None, roi_bounds=None):
    """The old array box (k, j, i) of a slice range and/or RAS box, as slices; None for all of it.
    The region is the engine's now (``geometry.region_box``); this keeps old scripts working."""
    from .geometry import make_region, region_box

    box = region_box(volume, make_region(slice_axis, slice_range, roi_bounds))
    return box.slices if box is not None else None


def crop_volume(volume, box):
    """The old crop by a tuple of slices (``geometry.crop_volume`` takes a ``geometry.Crop``)."""
    from .geometry import Crop, crop_volume as crop

    return crop(volume, Crop(tuple(s.start for s in box), tuple(s.stop for s in box)))


def uncrop(mask, box, shape):
    """The old uncrop by a tuple of slices (``geometry.uncrop`` takes a ``geometry.Crop``)."""
    from .geometry import Crop, uncrop as place

    return place(mask, None if box is None else Crop(tuple(s.start for s in box), tuple(s.stop for s in box)), shape)

__all__ = ["PanelState", "PanelController", "ModelChoice", "Guess", "Progress", "PanelMessage", "RunOutcome",
           "PollResult", "button_states", "state_from_parameters", "state_for_guess", "model_choices", "model_states",
           "guess_modality_site", "suggestions", "modalities_for", "sites_for", "match_modality", "match_site",
           "build_request", "describe_progress", "describe_error", "install_plan", "download_plan",
           "missing_requirements", "isolated_environment", "missing_engine_packages", "BackgroundSteps",
           "constraints_for_installed", "parse_prompts", "join_prompts", "read_dicom_tags", "order_dicom_files",
           "weights_progress", "crop_box", "crop_volume", "SLICE_AXES", "DEVICES", "POSTPROCESS", "WRITE_MODES",
           "EXPORT_FORMATS"]

#: Names the old module had beyond ``__all__`` (tests, scripts/render_panel.py and scenes use them).
COMPATIBLE_NAMES = __all__ + ["Request", "uncrop", "format_seconds", "device_label", "Step", "InstallPlan",
                              "env_python", "hub_cache_bytes", "DOWNLOAD_CODE", "WORKER_REQUIREMENTS",
                              "ENGINE_PACKAGES", "SITE_WORDS", "SITE_SYNONYMS", "get_model", "default_model_id"]
