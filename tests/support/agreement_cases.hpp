// The agreement cases every backend runs against the reference: the cpu layer, the cuda
// algorithm on a CPU and the cuda layer on a GPU. Include after defining `check<Expert, N>(proto, agreement_case, seed,
// options)` and SMEAR_AGREEMENT_SUBJECT (the tested layer's name in the test cases' names).

TEST_CASE(SMEAR_AGREEMENT_SUBJECT " equals the reference layer: adapter") {
  using E = adapter<float>;
  SUBCASE("odd sizes, ragged") { check<E, 3>(E{13, 5}, {.B = 5, .L = 7}, 31); }
  SUBCASE("B = 1, L = 1") { check<E, 8>(E{17, 3}, {.B = 1, .L = 1}, 32); }
  SUBCASE("full batch without lengths") { check<E, 4>(E{10, 3}, {.B = 3, .L = 4, .full = true}, 33); }
  SUBCASE("gelu, up bias, plain mean over padding") {
    check<E, 4>(E{24, 6, {.act = activation::gelu, .up_bias = true}}, {.B = 6, .L = 9}, 34,
                {.router = {.pool = pooling::mean}});
  }
  SUBCASE("relu and identity") {
    check<E, 2>(E{8, 3, {.act = activation::relu}}, {}, 35);
    check<E, 2>(E{8, 3, {.act = activation::identity}}, {}, 36);
  }
  SUBCASE("no LayerNorm, temperature 0.5") {
    check<E, 5>(E{11, 4}, {.B = 4, .L = 6}, 37, {.router = {.layer_norm = false, .temperature = 0.5}});
  }
  SUBCASE("detached router input") { check<E, 3>(E{7, 2}, {}, 38, {.router = {.detach_input = true}}); }
  SUBCASE("router weights normalised per expert, with and without the router's bias and LayerNorm") {
    check<E, 4>(E{9, 3}, {.B = 4, .L = 5}, 44, {.router = {.normalize_weights = true, .bias = false}});
    check<E, 3>(E{7, 2}, {.B = 3, .L = 4}, 45, {.router = {.layer_norm = false, .normalize_weights = true}});
    check<E, 4>(E{9, 3}, {.B = 4, .L = 5, .losses = true}, 46,
                official_options({.routing = {.strategy = smear::strategy::top_k, .estimator = estimator::reinforce,
                                              .baseline = baseline::learned}}));
  }
  SUBCASE("expert dropout, including rows with every expert dropped") {
    check<E, 6>(E{12, 4}, {.B = 8, .L = 4}, 39, {.router = {.expert_dropout = 0.3}});
    check<E, 2>(E{6, 2}, {.B = 16, .L = 3}, 40, {.router = {.expert_dropout = 0.9}});
  }
  SUBCASE("evaluation mode turns dropout off") {
    check<E, 4>(E{9, 3}, {.train = false}, 41, {.router = {.expert_dropout = 0.5}});
  }
  SUBCASE("residual turned off") { check<E, 3>(E{9, 3}, {}, 42, {.residual = false}); }
  SUBCASE("T5-base sized block") { check<E, 8>(E{768, 24}, {.B = 4, .L = 33}, 43); }
}

TEST_CASE(SMEAR_AGREEMENT_SUBJECT " equals the reference layer: causal segment routing") {
  using E = adapter<float>;
  const auto seg = [](std::size_t length, strategy_options s = {}) {
    layer_options o;
    o.router.segment_length = length;
    o.routing = s;
    return o;
  };
  SUBCASE("smear, ragged: units past an example's end") { check<E, 4>(E{9, 3}, {.B = 4, .L = 6}, 61, seg(2)); }
  SUBCASE("one segment per example, no lengths") { check<E, 3>(E{7, 2}, {.B = 3, .L = 4, .full = true}, 62, seg(4)); }
  SUBCASE("plain mean, evaluation") {
    auto o = seg(3);
    o.router.pool = pooling::mean;
    check<E, 4>(E{8, 3}, {.B = 3, .L = 9, .train = false}, 63, o);
  }
  SUBCASE("ensemble, switch top-2, ST-Gumbel") {
    check<E, 3>(E{7, 2}, {.B = 3, .L = 6}, 64, seg(2, {.strategy = strategy::ensemble}));
    check<E, 4>(E{7, 2}, {.B = 3, .L = 6}, 65,
                seg(3, {.strategy = strategy::top_k, .k = 2, .estimator = estimator::switch_gate}));
    check<E, 4>(E{7, 2}, {.B = 3, .L = 6}, 66, seg(2, {.strategy = strategy::top_k}));
  }
  SUBCASE("REINFORCE: each unit's loss is its example's") {
    check<E, 3>(E{7, 2}, {.B = 3, .L = 6, .losses = true}, 67,
                seg(2, {.strategy = strategy::top_k, .estimator = estimator::reinforce}));
  }
}

TEST_CASE(SMEAR_AGREEMENT_SUBJECT " equals the reference layer: lora, linear, double") {
  rng gen{50};
  SUBCASE("lora over a frozen map with bias") {
    lora<float> e{10, 6, 2, random_vector<float>(60, gen), random_vector<float>(6, gen), {.alpha = 4}};
    check<lora<float>, 3>(e, {.B = 4, .L = 5}, 51);
  }
  SUBCASE("lora without a frozen map") { check<lora<float>, 3>(lora<float>{7, 7, 3}, {}, 52); }
  SUBCASE("linear with and without bias") {
    check<linear<float>, 2>(linear<float>{7, 9}, {.B = 3, .L = 4}, 53);
    check<linear<float>, 4>(linear<float>{5, 3, {.bias = false}}, {.B = 2, .L = 6}, 54);
  }
  SUBCASE("double") {
    check<adapter<double>, 4>(adapter<double>{11, 6, {.up_bias = true}}, {.B = 3, .L = 5}, 55);
    check<lora<double>, 2>(lora<double>{6, 4, 2, random_vector<double>(24, gen)}, {}, 56);
  }
}

TEST_CASE(SMEAR_AGREEMENT_SUBJECT " equals the reference layer: conv adapter") {
  using C = conv_adapter<float>;
  // every example a whole H×W map: L = H·W, no lengths
  SUBCASE("3×3 kernel, smear") { check<C, 3>(C{3, 4, 5, 2}, {.B = 3, .L = 12, .full = true}, 91); }
  SUBCASE("5×5 kernel over a 2×3 map, gelu, up bias, double") {
    check<conv_adapter<double>, 4>(conv_adapter<double>{2, 3, 3, 2, {.act = activation::gelu, .kernel = 5, .up_bias = true}},
                                   {.B = 2, .L = 6, .full = true}, 92);
  }
  SUBCASE("1×1 map, and a 1×1 kernel") {
    check<C, 2>(C{1, 1, 4, 3}, {.B = 4, .L = 1, .full = true}, 93);
    check<C, 3>(C{2, 2, 6, 2, {.kernel = 1}}, {.B = 3, .L = 4, .full = true}, 94);
  }
  SUBCASE("ensemble, top-k, tag, adamix, a fixed distribution per task") {
    const C e{3, 3, 4, 2, {.up_bias = true}};
    const agreement_case c{.B = 4, .L = 9, .full = true};
    check<C, 3>(e, c, 95, {.routing = {.strategy = strategy::ensemble}});
    check<C, 3>(e, c, 96, {.routing = {.strategy = smear::strategy::top_k, .k = 2}});
    auto tagged = c;
    tagged.tags = true;
    check<C, 3>(e, tagged, 97, {.routing = {.strategy = strategy::tag}});
    check<C, 3>(e, c, 98, {.routing = {.strategy = strategy::adamix}});
    tagged.train = false;
    tagged.task_routing = true;
    check<C, 3>(e, tagged, 99);
  }
}

TEST_CASE(SMEAR_AGREEMENT_SUBJECT " equals the reference layer: ensemble, top-k, tag, hash, adamix, latent skills") {
  using E = adapter<float>;
  SUBCASE("tag") { check<E, 4>(E{9, 3}, {.B = 6, .L = 4, .tags = true}, 61, {.routing = {.strategy = strategy::tag}}); }
  SUBCASE("hash of token ids") {
    check<E, 3>(E{9, 3}, {.B = 6, .L = 4, .token_ids = true}, 62,
                {.routing = {.strategy = strategy::hash, .hash_seed = 5}});
  }
  SUBCASE("hash of example ids") {
    check<E, 5>(E{9, 3}, {.B = 7, .L = 3}, 63, {.routing = {.strategy = strategy::hash}});
  }
  SUBCASE("adamix: a random expert per parameter group in training, the average at inference") {
    check<E, 4>(E{9, 3, {.up_bias = true}}, {.B = 6, .L = 4}, 64, {.routing = {.strategy = strategy::adamix}});
    check<E, 3>(E{9, 3}, {.B = 5, .L = 3, .train = false}, 65, {.routing = {.strategy = strategy::adamix}});
  }
  SUBCASE("ensemble: every expert's output weighted by p, with expert dropout and at inference") {
    check<E, 3>(E{9, 3, {.up_bias = true}}, {.B = 5, .L = 4}, 68,
                {.router = {.expert_dropout = 0.3}, .routing = {.strategy = strategy::ensemble}});
    check<E, 4>(E{7, 2}, {.B = 3, .L = 5, .train = false}, 69, {.routing = {.strategy = strategy::ensemble}});
    check<lora<float>, 3>(lora<float>{6, 5, 2, std::vector<float>(30, 0.1f)}, {.B = 3, .L = 4}, 70,
                          {.routing = {.strategy = strategy::ensemble}});
    check<linear<float>, 2>(linear<float>{4, 6}, {.B = 2, .L = 3}, 71, {.routing = {.strategy = strategy::ensemble}});
  }
  SUBCASE("top-k: ST-Gumbel (k = 1 and 2), REINFORCE with both baselines, at inference too") {
    using strategy_t = smear::strategy;
    check<E, 4>(E{9, 3}, {.B = 6, .L = 4}, 72, {.routing = {.strategy = strategy_t::top_k}});
    check<E, 5>(E{8, 2, {.up_bias = true}}, {.B = 4, .L = 3}, 73, {.routing = {.strategy = strategy_t::top_k, .k = 2}});
    check<E, 3>(E{8, 2}, {.B = 4, .L = 3, .train = false}, 74, {.routing = {.strategy = strategy_t::top_k, .k = 2}});
    check<E, 4>(E{9, 3}, {.B = 6, .L = 4, .losses = true}, 75,
                {.routing = {.strategy = strategy_t::top_k, .estimator = estimator::reinforce, .entropy_bonus = 0.1}});
    check<E, 4>(E{9, 3}, {.B = 6, .L = 4, .losses = true}, 76,
                {.routing = {.strategy = strategy_t::top_k, .estimator = estimator::reinforce,
                             .baseline = baseline::learned}});
    check<E, 3>(E{9, 3}, {.B = 5, .L = 4, .train = false}, 77,
                {.routing = {.strategy = strategy_t::top_k, .estimator = estimator::reinforce}});
  }
  SUBCASE("top-k with DSelect-k: N a power of two and not, entropy and unused-code terms, inference") {
    using strategy_t = smear::strategy;
    check<E, 4>(E{9, 3}, {.B = 5, .L = 4}, 78,
                {.routing = {.strategy = strategy_t::top_k, .estimator = estimator::dselect}});
    check<E, 5>(E{8, 2}, {.B = 6, .L = 3}, 79,
                {.routing = {.strategy = strategy_t::top_k, .estimator = estimator::dselect,
                             .dselect_entropy = 0.1, .dselect_unused_penalty = 0.5}});
    check<E, 3>(E{8, 2}, {.B = 4, .L = 3, .train = false}, 80,
                {.routing = {.strategy = strategy_t::top_k, .estimator = estimator::dselect}});
  }
  SUBCASE("top-k switch: outputs scaled by p, renormalised or not, at inference too") {
    using strategy_t = smear::strategy;
    const strategy_options sw{.strategy = strategy_t::top_k, .estimator = estimator::switch_gate};
    check<E, 4>(E{9, 3}, {.B = 5, .L = 4}, 81, {.routing = sw});
    auto renorm = sw;
    renorm.k = 2;
    renorm.switch_renormalize = true;
    check<E, 5>(E{8, 2}, {.B = 4, .L = 3}, 82, {.routing = renorm});
    check<E, 3>(E{8, 2}, {.B = 4, .L = 3, .train = false}, 83, {.routing = sw});
  }
  SUBCASE("smear with a fixed distribution per task at inference: the cached merged experts") {
    check<E, 4>(E{9, 3}, {.B = 6, .L = 4, .train = false, .steps = 3, .tags = true, .task_routing = true}, 84);
    check<E, 3>(E{9, 3}, {.B = 5, .L = 3, .tags = true, .task_routing = true}, 85);  // training: the router
  }
  SUBCASE("random routing, and cluster routing (its centres move on every forward)") {
    check<E, 4>(E{9, 3}, {.B = 6, .L = 4, .steps = 3}, 86, {.routing = {.strategy = strategy::random}});
    check<E, 3>(E{9, 3}, {.B = 7, .L = 4, .steps = 3}, 87, {.routing = {.strategy = strategy::cluster}});
    check<E, 3>(E{9, 3}, {.B = 5, .L = 3, .train = false, .steps = 3}, 88,
                {.router = {.pool = pooling::mean}, .routing = {.strategy = strategy::cluster}});
  }
  SUBCASE("latent skills, training and inference") {
    const layer_options o{.routing = {.strategy = strategy::latent_skills, .tasks = 3}};
    check<E, 4>(E{9, 3}, {.B = 6, .L = 4, .tags = true}, 66, o);
    check<E, 4>(E{9, 3}, {.B = 6, .L = 4, .train = false, .tags = true}, 67, o);
  }
}

TEST_CASE(SMEAR_AGREEMENT_SUBJECT " equals the reference layer: soft_moe") {
  const layer_options one{.routing = {.strategy = strategy::soft_moe}};
  const layer_options two{.routing = {.strategy = strategy::soft_moe, .soft_slots = 2}};
  SUBCASE("adapter, ragged, s = 1 and 2, training and inference") {
    check<adapter<float>, 4>(adapter<float>{9, 3, {.up_bias = true}}, {.B = 5, .L = 6, .steps = 2}, 101, one);
    check<adapter<float>, 3>(adapter<float>{8, 2}, {.B = 4, .L = 5, .train = false}, 102, two);
    check<adapter<float>, 8>(adapter<float>{16, 4}, {.B = 1, .L = 1}, 103, two);
  }
  SUBCASE("residual off, full batch") {
    auto o = two;
    o.residual = false;
    check<adapter<float>, 3>(adapter<float>{7, 2}, {.B = 3, .L = 4, .full = true}, 104, o);
  }
  SUBCASE("lora and linear, double") {
    rng gen{105};
    check<lora<float>, 3>(lora<float>{6, 5, 2, random_vector<float>(30, gen)}, {.B = 3, .L = 4}, 106, two);
    check<linear<float>, 2>(linear<float>{4, 6}, {.B = 2, .L = 3}, 107, one);
    check<adapter<double>, 4>(adapter<double>{11, 6}, {.B = 3, .L = 5}, 108, two);
  }
}
