"""The line under the prompts: each prompt checked live, by the CLI's rules; a mixin of the module's widget.

What is a typo, what runs with a warning and what *Free text* allows is
``biomedseg.panel.prompt_notes``'s; this shows its sentence (red for a refusal, orange for a
warning) whenever the prompts, the model, the modality or the Free text box change, and tells
``updateButtons`` whether Segment may run.
"""
from biomedseg import panel

ERROR_STYLE = "color: #b00020;"
WARNING_STYLE = "color: #c25e00;"


class PromptCheckSection:
    """Needs the widget's ``ui``, ``_parameterNode``, ``currentChoice`` and ``updateButtons``."""

    def setupPromptChecks(self):
        self._promptNotes = []
        self.ui.promptsLineEdit.connect("textChanged(QString)", lambda _: self.showPromptNotes())
        self.ui.modalityComboBox.connect("currentTextChanged(QString)", lambda _: self.showPromptNotes())
        self.ui.modelComboBox.connect("currentIndexChanged(int)", lambda _: self.showPromptNotes())
        self.ui.freeTextCheckBox.connect("toggled(bool)", lambda _: self.showPromptNotes())

    def showPromptNotes(self):
        choice = self.currentChoice()
        if choice is None:
            self._promptNotes = []
        else:
            self._promptNotes = panel.prompt_notes(choice.id, self.ui.promptsLineEdit.text,
                                                   self.ui.modalityComboBox.currentText,
                                                   self.ui.freeTextCheckBox.checked)
            self.ui.freeTextCheckBox.visible = choice.free_text
        text = panel.notes_line(self._promptNotes)
        self.ui.promptCheckLabel.text = text
        self.ui.promptCheckLabel.visible = bool(text)
        self.ui.promptCheckLabel.styleSheet = WARNING_STYLE if panel.can_segment(self._promptNotes) else ERROR_STYLE
        self.updateButtons()

    def promptsOk(self) -> bool:
        return panel.can_segment(getattr(self, "_promptNotes", []))
