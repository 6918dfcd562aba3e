// Our optimizer against PyTorch's own AdamW / SGD and clip_grad_norm_ (tests/optim/
// torch_reference.py, run once with Debian's /usr/bin/python3; a missing torch fails the test).
#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <nlohmann/json.hpp>

#include "moe/optim/optimizer.h"
#include "support/testing.h"
#include "test_model.h"

namespace moe::optim {
namespace {

using moe::testing::param_spec;
using moe::testing::random_normal;

// One optimizer run: our results, and the case description torch replays.
struct Case {
  std::unique_ptr<ParameterStore> store = std::make_unique<ParameterStore>();
  std::vector<ParamHandle> handles;
  std::vector<double> norms;
  nlohmann::json input;
};

Case run_case(const std::string& optimizer_name) {
  Case c;
  ParameterStore& store = *c.store;
  c.handles = {store.declare(param_spec("fc.weight", {5, 17})),
               store.declare(param_spec("fc.bias", {17})),
               store.declare(param_spec("experts.w", {2, 3, 4}, ParamGroup::kExpert))};
  store.allocate();
  OptimizerConfig config;
  config.optimizer = optimizer_name;
  config.weight_decay = 0.2;
  config.adam_beta1 = 0.85;
  config.adam_beta2 = 0.98;
  config.adam_eps = 1e-6;
  config.sgd_momentum = 0.8;
  config.clip_grad = 3.0;  // the N(0, 1) gradients' norm (~10) is above: every step clips
  comm::ParallelState single = comm::single_process_state();
  Optimizer optimizer(store, single, config);
  c.input = {{"optimizer", optimizer_name},
             {"weight_decay", 0.2},
             {"adam_beta1", 0.85},
             {"adam_beta2", 0.98},
             {"adam_eps", 1e-6},
             {"sgd_momentum", 0.8},
             {"clip_grad", config.clip_grad},
             {"lrs", nlohmann::json::array()},
             {"params", nlohmann::json::array()},
             {"grads", nlohmann::json::array()}};
  for (size_t i = 0; i < c.handles.size(); ++i) {
    Tensor init = random_normal(store.param(c.handles[i]).shape(), 50 + i);
    store.param(c.handles[i]).copy_from(init);
    const ParamSpec& spec = store.spec(c.handles[i]);
    c.input["params"].push_back({{"name", spec.name},
                                 {"shape", spec.shape},
                                 {"values", init.to_floats()},
                                 {"decay", spec.name != "fc.bias"}});
  }
  for (int step = 0; step < 5; ++step) {
    double lr = 0.02 / (step + 1);
    c.input["lrs"].push_back(lr);
    optimizer.set_lr(lr);
    nlohmann::json grads = nlohmann::json::object();
    for (size_t i = 0; i < c.handles.size(); ++i) {
      Tensor g = random_normal(store.grad(c.handles[i]).shape(), 500 + 10 * step + i);
      store.grad(c.handles[i]).copy_from(g);
      grads[store.spec(c.handles[i]).name] = g.to_floats();
    }
    c.input["grads"].push_back(grads);
    c.norms.push_back(optimizer.step().grad_norm);
  }
  return c;
}

TEST(TorchCrossCheck, AdamWAndSgdStepsWithClippingMatchPyTorch) {
  MOE_REQUIRE_PYTHON_PACKAGE("torch");
  std::vector<Case> cases;
  nlohmann::json input = nlohmann::json::array();
  for (const char* name : {"adam", "sgd"}) {
    cases.push_back(run_case(name));
    input.push_back(cases.back().input);
  }
  nlohmann::json output;
  {
    moe::testing::ScratchDir dir("torch_optim");
    moe::testing::write_bytes(dir.file("in.json"), input.dump());
    std::string command = "/usr/bin/python3 " + std::string(MOE_OPTIM_TORCH_REFERENCE) + " " +
                          dir.file("in.json") + " " + dir.file("out.json");
    int status = std::system(command.c_str());
    ASSERT_EQ(status, 0) << command;
    output = nlohmann::json::parse(moe::testing::read_bytes(dir.file("out.json")));
  }

  for (size_t k = 0; k < cases.size(); ++k) {
    const Case& c = cases[k];
    std::string name = c.input["optimizer"];
    for (size_t step = 0; step < c.norms.size(); ++step) {
      EXPECT_NEAR(c.norms[step], output[k]["grad_norms"][step].get<double>(), 1e-5 * c.norms[step])
          << name << " step " << step;
    }
    for (ParamHandle h : c.handles) {
      const std::string& param = c.store->spec(h).name;
      std::vector<float> expected = output[k]["params"][param].get<std::vector<float>>();
      EXPECT_TENSORS_CLOSE(c.store->param(h),
                           Tensor::from_floats(expected, c.store->param(h).shape()), 1e-6, 1e-5)
          << name << " " << param;
    }
  }
}

}  // namespace
}  // namespace moe::optim
