"""Every default a user sees, in one place: the library's, the pipeline's and the
stack's settings read them from here (the command line shows them, never repeats them)."""

MODEL = "smollm2-135m"  # the preset quantized when no model is given
RECIPE = "gptq-w4g64"  # the shipped recipe of `quantmill run`
SWEEP_RECIPES = ("rtn-w4g64", "gptq-w4g64")
OUTPUT_ROOT = "outputs"  # a run's checkpoint goes to OUTPUT_ROOT/<model>-<recipe>
SWEEP_ROOT = "outputs/sweep"
# runs started from the UI or the API read their inputs under these folders (and under
# $QUANTMILL_DATA_DIR when set) or under the output root, unless $QUANTMILL_DATA_ROOTS
# names the folders (flows/places.py)
DATA_ROOTS = ("data",)
MAX_CONCURRENCY = 2  # recipes of a sweep quantized at once
EXPERIMENT = "quantmill"  # the MLflow experiment
MAX_RUNS_SEARCHED = 1000  # RUNNING runs looked at per experiment when ending dead ones
TOKEN_SECRET = "hf-token"  # the Prefect Secret block holding the Hub token
POOL = "quantmill"  # the Prefect work pool of the deployments
BUCKET = "quantmill"  # the S3 bucket of artifacts and the shared cache
HEARTBEAT_S = 30  # how often a worker's flow runs send a heartbeat (Prefect's least)
CRASH_AFTER_S = 90  # a run without a heartbeat for this long is marked Crashed
VLLM_VENV = ".venv-vllm"  # vLLM's own virtual environment (scripts/vllm-venv.sh makes it)
# what the vLLM verifier sets unless the caller's environment already does: vLLM 0.32
# on CPUs with AMX runs 4-bit weight-only checkpoints as W4A8 (its activations cut to
# int8, not the scheme the checkpoint declares), and that path's repacking refuses
# per-channel weights whose input size is not a multiple of 128 (SmolLM2's 576)
VLLM_ENV = {"VLLM_CPU_INT4_W4A8": "0"}
VERIFY_PROMPT = "The capital of France is"  # what the verifiers generate from
VERIFY_TOKENS = 8  # greedy tokens compared between an engine and transformers
# the most an engine's greedy token may trail transformers' choice, in log-probability
# (vLLM's CPU kernels run bfloat16 activations; near ties may flip)
VERIFY_MAX_GAP = 0.5
