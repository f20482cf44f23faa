"""Plain transformers, as a user without VRAMancer would start: load the GGUF, answer with one
token, print one JSON line. Run as a script (it imports nothing of VRAMancer's):

    python benchmarks/plain_load.py FOLDER FILE.gguf PROMPT
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, gguf_file, prompt = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()
inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
start = time.perf_counter()
with torch.inference_mode():
    out = model.generate(**inputs, max_new_tokens=1, do_sample=False, temperature=None, top_p=None, top_k=None)
ttft = time.perf_counter() - start
print(json.dumps({"token_ids": out[0, inputs["input_ids"].shape[1]:].tolist(), "ttft_s": ttft}), flush=True)
