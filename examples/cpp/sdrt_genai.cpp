// sdrt_genai: an sdrt openvino engine folder, loaded and run by OpenVINO GenAI's C++ Text2ImagePipeline.
//
//   sdrt_genai ENGINE_DIR "PROMPT" OUT.png [SEED] [STEPS] [WIDTH HEIGHT]
//
// The image equals `sdrt generate ENGINE_DIR --prompt PROMPT --seed SEED --steps STEPS --noise cpp-std
// --scheduler S --guidance 7.5` (S: what `sdrt info ENGINE_DIR` names on its "embedding" line), up to
// uint8 rounding: GenAI's default generator in C++ is CppStdGenerator, whose stream `--noise cpp-std`
// reproduces. The compute type (INFERENCE_PRECISION_HINT) is read from the folder's manifest.json:
// without it OpenVINO computes in bf16 on CPUs that have it, whatever the engines were built as.

#include <cstdint>
#include <fstream>
#include <iostream>
#include <memory>
#include <regex>
#include <sstream>
#include <string>

#include <png.h>

#include "openvino/genai/image_generation/text2image_pipeline.hpp"

namespace {

// The value manifest.json records under openvino_genai.properties.INFERENCE_PRECISION_HINT ("f32", "bf16", ...).
std::string precision_hint(const std::string& engine_dir) {
    std::ifstream file(engine_dir + "/manifest.json");
    if (!file)
        throw std::runtime_error(engine_dir + " is not an sdrt engine folder (manifest.json is missing)");
    std::stringstream text;
    text << file.rdbuf();
    std::smatch match;
    const std::string manifest = text.str();
    if (!std::regex_search(manifest, match, std::regex("\"INFERENCE_PRECISION_HINT\":\\s*\"([a-z0-9]+)\"")))
        throw std::runtime_error(engine_dir + " has no OpenVINO GenAI view: build it with `sdrt build MODEL --backend openvino`");
    return match[1];
}

// image: (1, H, W, 3) uint8, as GenAI returns it
void write_png(const ov::Tensor& image, const std::string& path) {
    const ov::Shape shape = image.get_shape();
    png_image png{};
    png.version = PNG_IMAGE_VERSION;
    png.width = static_cast<png_uint_32>(shape[2]);
    png.height = static_cast<png_uint_32>(shape[1]);
    png.format = PNG_FORMAT_RGB;
    if (!png_image_write_to_file(&png, path.c_str(), 0, image.data<const uint8_t>(), 0, nullptr))
        throw std::runtime_error("cannot write " + path + ": " + png.message);
}

}  // namespace

int main(int argc, char* argv[]) try {
    if (argc != 4 && argc != 5 && argc != 6 && argc != 8) {
        std::cerr << "usage: " << argv[0] << " ENGINE_DIR \"PROMPT\" OUT.png [SEED] [STEPS] [WIDTH HEIGHT]\n";
        return 2;
    }
    const std::string engine_dir = argv[1], prompt = argv[2], out = argv[3];
    const uint32_t seed = argc > 4 ? static_cast<uint32_t>(std::stoul(argv[4])) : 0;
    const size_t steps = argc > 5 ? std::stoul(argv[5]) : 20;

    ov::genai::Text2ImagePipeline pipe(engine_dir, "CPU", ov::AnyMap{{"INFERENCE_PRECISION_HINT", precision_hint(engine_dir)}});
    ov::AnyMap generation{ov::genai::num_inference_steps(steps), ov::genai::guidance_scale(7.5f),
                          ov::genai::generator(std::make_shared<ov::genai::CppStdGenerator>(seed))};
    if (argc == 8) {  // else the model's size
        generation.insert(ov::genai::width(std::stoll(argv[6])));
        generation.insert(ov::genai::height(std::stoll(argv[7])));
    }

    write_png(pipe.generate(prompt, generation), out);
    std::cout << out << "\n";
    return 0;
} catch (const std::exception& error) {
    std::cerr << "sdrt_genai: error: " << error.what() << "\n";
    return 1;
}
