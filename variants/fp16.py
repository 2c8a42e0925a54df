"""fp16: the unquantized baseline, every weight in the run's --dtype (fp16 on CUDA by default)."""
from variants.base import WeightsPart


class Fp16Weights(WeightsPart):
    name = "fp16"
    description = "unquantized weights in --dtype (the baseline; fp32 on CPU by default)"

    def load(self, source, device, dtype, options):
        return self.loaded(source.load(device, dtype), options)


PARTS = [Fp16Weights()]
