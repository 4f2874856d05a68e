"""Activations and per-example gradients read out of a model, batched by length, reduced on the fly."""

from mechsieve.capture.activations import CaptureConfig, CaptureResult, capture, capture_pool
from mechsieve.capture.batching import BatchPlan, Collated, collate, plan_batches
from mechsieve.capture.forward import BatchContext, ForwardSpec, run_forward
from mechsieve.capture.reductions import REDUCTIONS

__all__ = ["REDUCTIONS", "BatchContext", "BatchPlan", "CaptureConfig", "CaptureResult", "Collated",
           "ForwardSpec", "capture", "capture_pool", "collate", "plan_batches", "run_forward"]
