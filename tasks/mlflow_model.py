"""MLflow pyfunc model around a quantized checkpoint, saved as "models from code":
MLflow copies this file beside the checkpoint, so loading the registered model
needs transformers and compressed-tensors but not quantmill.

    model = mlflow.pyfunc.load_model("models:/SmolLM2-135M-Instruct@candidate")
    model.predict(["The capital of France is"], params={"max_new_tokens": 20})
"""

import mlflow
from mlflow.pyfunc import PythonModel


class QuantizedCausalLM(PythonModel):
    def load_context(self, context):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = context.artifacts["checkpoint"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def predict(self, context, model_input, params=None):
        """Greedy continuations of a list of prompts (or of a one-column DataFrame)."""
        import torch

        if hasattr(model_input, "columns"):  # the signature turns a list into a DataFrame
            model_input = model_input[model_input.columns[0]]
        prompts = [model_input] if isinstance(model_input, str) else list(model_input)
        max_new_tokens = int((params or {}).get("max_new_tokens", 32))
        texts = []
        for prompt in prompts:
            inputs = self.tokenizer(str(prompt), return_tensors="pt")
            with torch.inference_mode():
                out = self.model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                )
            new = out[0][inputs["input_ids"].shape[1] :]
            texts.append(self.tokenizer.decode(new, skip_special_tokens=True))
        return texts


mlflow.models.set_model(QuantizedCausalLM())
