"""What the Slicer panel does, without Qt and without importing Slicer or torch.

``BiomedSeg.py`` is a thin view: it reads its widgets into a ``PanelState``, hands it to a
``PanelController`` with the MRML nodes, calls ``poll()`` from a QTimer and shows what comes
back; its Install and Download buttons follow an ``InstallFlow``. Everything that can be
wrong lives in this package, one module per job, and is tested against real MRML classes
(slicer-core), a real worker process and real installer processes:

- ``state``: the widgets' choices (also the parameter node's) and the ``PanelState``;
- ``models``: the model list with each model's state in the worker's Python;
- ``guessing``: modality and site from DICOM tags and intensities, in the model's words, and
  the catalogue's prompt suggestions for them;
- ``request``: the worker request built and checked from the panel state (prompts, region, options, the
  modality guard);
- ``prompt_feedback``: each typed prompt checked live by the CLI's rules (typo, not trained here, free text);
- ``messages``: progress with the time left, errors as a sentence with what to do, buttons;
- ``controller``: submit, poll, apply with undo (add or overwrite), cancel, export;
- ``recognition``: BiomedCLIP in the background: the image recognised (modality, site, view) into the
  guess, the typed prompts checked against the model's targets (a warning, not a block), and the
  slices ranked for a target (Find slices, Suggest key slice), in one worker session per volume;
- ``correction``: the Correct section for interactive models: boxes and clicks, propagate over a
  slice range, refine a segment, corrections in the same worker session, undo, and what the next
  click will do (writes only inside the Segment Editor's editable area);
- ``findings``: a text-with-masks model's findings with each grounded phrase linked to its segment;
- ``install`` and ``background_steps``: first-run installs and downloads that never replace
  the packages of Slicer's own Python, run as background processes;
- ``worker_python``: the environment of a Python other than Slicer's.

MRML nodes are only passed through to ``slicer_bridge``; nothing here touches them itself.
"""
from .background_steps import BackgroundSteps
from .controller import PanelController, PollResult
from .correction import SHORTCUTS, TOOLS, CorrectionController, CorrectionOutcome, CorrectionSession
from .findings import FindingView, PhraseLink, finding_views, findings_html, phrase_segments, segment_of_link
from .guessing import (Guess, ModelView, guess_modality_site, match_modality, match_site, modalities_for, model_view,
                       read_dicom_tags, sites_for, state_for_guess, suggestions)
from .install import (DOWNLOAD_CODE, ENGINE_PACKAGES, WORKER_REQUIREMENTS, InstallFinish, InstallFlow, InstallOffer,
                      InstallPlan, InstallPoll, Question, Step, constraints_for_installed, download_plan, env_python,
                      hub_cache_bytes, install_plan, missing_engine_packages, missing_requirements, weights_progress)
from .messages import (ACTION_LABELS, PanelMessage, Progress, RunOutcome, button_states, describe_error,
                       describe_progress, device_label, format_seconds, time_left)
from .models import ModelChoice, device_supported, model_choices, model_states
from .recognition import ClipOutcome, Recognition, RecognitionController, RecognizedGuess, merge_guess, slice_centre
from .prompt_feedback import PromptNote, can_segment, notes_line, prompt_notes
from .request import Request, build_request, geometric_prompts
from .state import (DEVICES, EXPORT_FORMATS, POSTPROCESS, SLICE_AXES, WRITE_MODES, PanelState, chosen_prompts,
                    join_prompts, parse_prompts, state_from_parameters, toggle_prompt)
from .worker_python import isolated_environment, same_python, with_engine_on_path

__all__ = [
    # state
    "SLICE_AXES", "DEVICES", "POSTPROCESS", "WRITE_MODES", "EXPORT_FORMATS", "PanelState", "state_from_parameters",
    "parse_prompts", "join_prompts", "toggle_prompt", "chosen_prompts",
    # models
    "ModelChoice", "model_states", "model_choices", "device_supported",
    # guessing
    "Guess", "guess_modality_site", "read_dicom_tags", "modalities_for", "sites_for", "match_modality", "match_site",
    "state_for_guess", "suggestions", "ModelView", "model_view",
    # request
    "Request", "build_request", "geometric_prompts", "PromptNote", "prompt_notes", "notes_line", "can_segment",
    # messages
    "Progress", "PanelMessage", "RunOutcome", "button_states", "describe_progress", "describe_error",
    "format_seconds", "time_left", "device_label", "ACTION_LABELS",
    # controller
    "PanelController", "PollResult",
    # recognition (BiomedCLIP)
    "RecognitionController", "Recognition", "RecognizedGuess", "ClipOutcome", "merge_guess", "slice_centre",
    # correction
    "CorrectionController", "CorrectionSession", "CorrectionOutcome", "TOOLS", "SHORTCUTS",
    # findings of text-with-masks models (UniBiomed)
    "FindingView", "PhraseLink", "phrase_segments", "finding_views", "findings_html", "segment_of_link",
    # installs
    "Step", "InstallPlan", "install_plan", "download_plan", "missing_requirements", "missing_engine_packages",
    "constraints_for_installed", "env_python", "hub_cache_bytes", "weights_progress", "BackgroundSteps",
    "InstallFlow", "InstallOffer", "Question", "InstallFinish", "InstallPoll", "WORKER_REQUIREMENTS",
    "ENGINE_PACKAGES", "DOWNLOAD_CODE",
    # worker python
    "isolated_environment", "same_python", "with_engine_on_path",
]
