"""Deployment: ONNX export with parity checks (``onnx``), Hugging Face conversion (``hf``), timing (``benchmark``).

Reference entry points: ``python -m cn_clip.deploy.pytorch_to_onnx``, ``speed_benchmark``, ``onnx_to_tensorrt``,
``pytorch_to_coreml``. Nothing is imported here, so ``import cn_clip.deploy`` stays cheap.
"""
