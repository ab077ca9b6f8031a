"""Other tools' formats: a soft prompt as a Hugging Face PEFT adapter (``peft.py``) and back (``peft_import.py``)."""
