"""The brief LLM, trained here (docs/brief-llm.md): labelled texts (`data`), a corpus-trained
tokenizer (`tokenizer`), a small Qwen2 causal LM (`model`), SFT (`sft`), GRPO under the rollback
guard (`grpo`), the field score and reward (`score`), batched generation (`generation`), the
versioned Hugging Face export (`export`) and the `lf-train task=brief_llm` entry (`task`).

Nothing is imported here: `import lightning_fragrance.llm.score` must not pay for transformers.
"""
