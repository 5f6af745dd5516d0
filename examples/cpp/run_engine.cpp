// One denoising step of a dqdeploy TensorRT engine (TensorRT 10.x C++ API, enqueueV3).
//
//   run_engine ENGINE.plan IN_DIR OUT_DIR
//
// IN_DIR/tensors.txt lists the inputs, one per line: "<name> <dtype> <rank> <d0> ... <file>"
// (written by save_inputs.py; dtype is float32, float16, int32 or int64; files are raw little-endian
// row-major data). Every engine output is written to OUT_DIR/<name>.bin and listed in
// OUT_DIR/tensors.txt in the same format; `save_inputs.py compare` checks it against ONNX Runtime.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace
{

void check(cudaError_t status, char const* what)
{
    if (status != cudaSuccess)
    {
        throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
    }
}

class Logger : public nvinfer1::ILogger
{
    void log(Severity severity, char const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            std::cerr << "[TensorRT] " << msg << "\n";
        }
    }
};

struct Tensor
{
    std::string name;
    std::string dtype;
    std::vector<int64_t> shape;
    std::string file;
    std::vector<char> data;
};

size_t itemSize(std::string const& dtype)
{
    static std::map<std::string, size_t> const sizes{{"float32", 4}, {"float16", 2}, {"int32", 4}, {"int64", 8}};
    auto it = sizes.find(dtype);
    if (it == sizes.end())
    {
        throw std::runtime_error("unsupported dtype " + dtype);
    }
    return it->second;
}

std::string dtypeName(nvinfer1::DataType type)
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: return "float32";
    case nvinfer1::DataType::kHALF: return "float16";
    case nvinfer1::DataType::kINT32: return "int32";
    case nvinfer1::DataType::kINT64: return "int64";
    default: throw std::runtime_error("engine tensor of a type this example does not handle");
    }
}

size_t volume(std::vector<int64_t> const& shape)
{
    size_t n = 1;
    for (auto d : shape)
    {
        n *= static_cast<size_t>(d);
    }
    return n;
}

std::vector<char> readFile(std::string const& path)
{
    std::ifstream in(path, std::ios::binary);
    if (!in)
    {
        throw std::runtime_error("cannot open " + path);
    }
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::map<std::string, Tensor> readInputs(std::string const& dir)
{
    std::ifstream list(dir + "/tensors.txt");
    if (!list)
    {
        throw std::runtime_error("cannot open " + dir + "/tensors.txt (write it with save_inputs.py save)");
    }
    std::map<std::string, Tensor> tensors;
    std::string line;
    while (std::getline(list, line))
    {
        if (line.empty())
        {
            continue;
        }
        std::istringstream fields(line);
        Tensor t;
        int rank = 0;
        fields >> t.name >> t.dtype >> rank;
        t.shape.resize(rank);
        for (auto& d : t.shape)
        {
            fields >> d;
        }
        fields >> t.file;
        t.data = readFile(dir + "/" + t.file);
        if (t.data.size() != volume(t.shape) * itemSize(t.dtype))
        {
            throw std::runtime_error(t.file + ": size does not match its shape and dtype");
        }
        tensors[t.name] = std::move(t);
    }
    return tensors;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 4)
    {
        std::cerr << "usage: " << argv[0] << " ENGINE.plan IN_DIR OUT_DIR\n";
        return 2;
    }
    try
    {
        Logger logger;
        std::vector<char> plan = readFile(argv[1]);
        std::unique_ptr<nvinfer1::IRuntime> runtime{nvinfer1::createInferRuntime(logger)};
        std::unique_ptr<nvinfer1::ICudaEngine> engine{runtime->deserializeCudaEngine(plan.data(), plan.size())};
        if (!engine)
        {
            throw std::runtime_error("cannot deserialize the engine (built by another TensorRT version or GPU?)");
        }
        std::unique_ptr<nvinfer1::IExecutionContext> context{engine->createExecutionContext()};
        std::map<std::string, Tensor> inputs = readInputs(argv[2]);
        std::vector<void*> buffers;
        std::vector<Tensor> outputs;

        // inputs: copy to the GPU, set their shapes
        for (int32_t i = 0; i < engine->getNbIOTensors(); ++i)
        {
            char const* name = engine->getIOTensorName(i);
            if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kINPUT)
            {
                continue;
            }
            auto it = inputs.find(name);
            if (it == inputs.end())
            {
                throw std::runtime_error(std::string("no saved input for engine input ") + name);
            }
            Tensor const& t = it->second;
            if (t.dtype != dtypeName(engine->getTensorDataType(name)))
            {
                throw std::runtime_error(std::string(name) + ": saved as " + t.dtype + ", the engine takes "
                    + dtypeName(engine->getTensorDataType(name)));
            }
            nvinfer1::Dims dims{};
            dims.nbDims = static_cast<int32_t>(t.shape.size());
            for (int32_t d = 0; d < dims.nbDims; ++d)
            {
                dims.d[d] = t.shape[d];
            }
            if (!context->setInputShape(name, dims))
            {
                throw std::runtime_error(std::string(name) + ": shape outside the engine's optimization profile");
            }
            void* device = nullptr;
            check(cudaMalloc(&device, t.data.size()), "cudaMalloc");
            check(cudaMemcpy(device, t.data.data(), t.data.size(), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
            context->setTensorAddress(name, device);
            buffers.push_back(device);
        }

        // outputs: shapes follow from the input shapes
        std::vector<void*> outputBuffers;
        for (int32_t i = 0; i < engine->getNbIOTensors(); ++i)
        {
            char const* name = engine->getIOTensorName(i);
            if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kOUTPUT)
            {
                continue;
            }
            nvinfer1::Dims dims = context->getTensorShape(name);
            Tensor t;
            t.name = name;
            t.dtype = dtypeName(engine->getTensorDataType(name));
            t.shape.assign(dims.d, dims.d + dims.nbDims);
            t.file = t.name + ".bin";
            t.data.resize(volume(t.shape) * itemSize(t.dtype));
            void* device = nullptr;
            check(cudaMalloc(&device, t.data.size()), "cudaMalloc");
            context->setTensorAddress(name, device);
            buffers.push_back(device);
            outputBuffers.push_back(device);
            outputs.push_back(std::move(t));
        }

        cudaStream_t stream = nullptr;
        check(cudaStreamCreate(&stream), "cudaStreamCreate");
        if (!context->enqueueV3(stream))
        {
            throw std::runtime_error("enqueueV3 failed");
        }
        check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        check(cudaStreamDestroy(stream), "cudaStreamDestroy");

        std::string const outDir = argv[3];
        std::ofstream list(outDir + "/tensors.txt");
        for (size_t k = 0; k < outputs.size(); ++k)
        {
            Tensor& t = outputs[k];
            check(cudaMemcpy(t.data.data(), outputBuffers[k], t.data.size(), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
            std::ofstream(outDir + "/" + t.file, std::ios::binary).write(t.data.data(), static_cast<std::streamsize>(t.data.size()));
            list << t.name << " " << t.dtype << " " << t.shape.size();
            for (auto d : t.shape)
            {
                list << " " << d;
            }
            list << " " << t.file << "\n";
            std::cout << "wrote " << outDir << "/" << t.file << "\n";
        }
        for (void* b : buffers)
        {
            cudaFree(b);
        }
    }
    catch (std::exception const& e)
    {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
    return 0;
}
