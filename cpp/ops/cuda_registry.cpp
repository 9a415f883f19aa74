// Built without the CUDA op library: report it.
namespace layerpress {
bool cuda_ops_built() { return false; }
}
