"""`custom_dataset` loaders and re-exported lm-eval task functions for the offline task files in this folder.

The loaders read the local copies in the harness data directory (given as `data_dir` in the task manager's
metadata) converted back into the original Hugging Face schema (harness/lmeval_data.py). The prompt
functions are lm-eval's own, imported from its installed package, so that the offline tasks build the same
requests as lm-eval's definitions.
"""
from functools import partial

from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.super_glue.copa.utils import (  # noqa: F401
    doc_to_choice as copa_doc_to_choice,
    doc_to_target as copa_doc_to_target,
    doc_to_text as copa_doc_to_text,
)
from lm_eval.tasks.wikitext.preprocess_wikitext import (  # noqa: F401
    process_results as wikitext_process_results,
    wikitext_detokenizer,
)
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_choice as winogrande_doc_to_choice,
    doc_to_target as winogrande_doc_to_target,
    doc_to_text as winogrande_doc_to_text,
)

from harness.lmeval_data import load

load_piqa = partial(load, "piqa")
load_copa = partial(load, "copa")
load_winogrande = partial(load, "winogrande")
load_rte = partial(load, "rte")
load_lambada_openai = partial(load, "lambada_openai")
load_openbookqa = partial(load, "openbookqa")
load_arc_easy = partial(load, "arc_easy")
load_hellaswag = partial(load, "hellaswag")
load_wikitext = partial(load, "wikitext")
