"""Model compression beyond quantization (llmlab.quant): pruning and knowledge distillation.

    calibration      what each linear layer's input channels carry on real text (Wanda's ‖X_j‖)
    unstructured     magnitude and Wanda pruning: exact zeros anywhere, per layer or global
    semi_structured  2:4 sparsity: two non-zeros in every four inputs, and the GPU's sparse kernels
    structured       whole MLP channels and attention heads removed: a physically smaller model
    distill          a student trained on the teacher's soft labels

Each technique is its own module; none changes the model's code.
"""
